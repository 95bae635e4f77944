"""Incremental batch: a nightly batch of 10 % more images; preprocess decodes only the new files.

Set-up (untimed): a scratch project (tests.scratch.make_project, params.yaml's defaults:
64 px, 3 channels) gets N generated 128 px images in OLD_BATCHES batches and tonight's batch of
N/10 (components.synthetic.write_batch, in parallel); ingest + validate of the grown snapshot.
Last night's preprocess is the stage run on that manifest without tonight's rows: it fills
the decoded-image cache (``<.dvc/cache>/anomaly-preprocess``) with the N old images, and that
cache folder is copied aside as the warm state. (Validating the old snapshot separately would
give the same rows for the old files and only cost set-up time.)

Timed, side by side, ``repeats`` times, on the grown snapshot (1.1 N images):

* full: the cache folder removed, so every image is decoded (what preprocess cost before
  the cache, plus writing the cache's pack);
* incremental: the warm cache folder restored, so only the N/10 new images are decoded.

Each is ``python -m pipeline preprocess`` run as a child process in the project (through a
small driver that runs the same ``pipeline.cli.main(["preprocess"])`` and also prints the
stage's time after its imports: the in-process part, without the interpreter's start-up and
the numpy/pyarrow/PIL imports: benchmarks.common.PREPROCESS_IMPORTS). The outputs of both must be the same bytes, and the
decoded/cached counts the stage prints are checked.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from benchmarks.common import PREPROCESS_IMPORTS, PYTHON, SCRATCH_DEFAULTS, Context, Figure, bench_env, check, ratios, \
    run_child, write_batches
from tests.scratch import make_project

TITLE = "4. Incremental batch: preprocess of a snapshot grown by 10 %, against a full preprocess"

TARGET = 0.25
IMAGE_SIZE = 128          # generated images (components.synthetic's default); the stage makes 64 px of them
FULL_IMAGES = 5000
QUICK_IMAGES = 100
OLD_BATCHES = 4           # the snapshot so far is this many batches (generated in parallel)
MARK = "INCREMENTAL-TIMING"

NOTES = f"""\
Grown snapshot = N + N/10 generated {IMAGE_SIZE} px PNGs (N = {FULL_IMAGES} in full mode, {QUICK_IMAGES} quick); params.yaml's
defaults (64 px, 3 channels). *full*: the decoded-image cache removed, every image decoded (and a cache pack
written); *incremental*: the cache as the previous night (N images) left it, only the N/10 new images decoded.
*process* is the whole `python -m pipeline preprocess` child; *stage* is `pipeline.cli.main(["preprocess"])`
timed inside it after its imports (numpy, pyarrow, PIL and its plugins). Ratios pair the i-th full run with the i-th
incremental run (interleaved). Peak memory is the child's VmHWM. Both runs' outputs are checked to be the
same bytes. The cache's pack was just written, so it is read from the page cache (as are the PNGs).
"""

CHILD = f"""
import sys, time, importlib
started = time.perf_counter()
for name in {PREPROCESS_IMPORTS!r}:
    importlib.import_module(name)
imported = time.perf_counter()
from pipeline.cli import main
code = main(["preprocess"])
worked = time.perf_counter() - imported
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("{MARK} imports=%.6f work=%.6f vmhwm_kb=%d" % (imported - started, worked, peak_kb), flush=True)
raise SystemExit(code)
"""
COUNTS = re.compile(r"decoded (\d+), from the cache (\d+)")


def _composition(count: int) -> tuple[int, int]:
    """(good, per defect kind) of a batch: 2 % of the images per defect kind (four kinds, at
    least 3 each so that a small snapshot passes validate's minimum of anomalies), the rest good."""
    per_defect = max(3, round(count * 0.02)) if count >= 40 else 1
    return count - 4 * per_defect, per_defect


def _generate(landing: Path, batches: list[tuple[str, int, int]], log) -> None:
    """Batches (name, seed, images), written in parallel."""
    from components.synthetic import BatchSpec

    seconds = write_batches(landing, [(name, seed, BatchSpec(*_composition(count), IMAGE_SIZE))
                                      for name, seed, count in batches])
    log(f"  set-up: generated {sum(count for *_, count in batches)} images in {seconds:.0f} s")


def _pipeline(project: Path, *stages: str) -> None:
    for stage in stages:
        run_child([PYTHON, "-m", "pipeline", stage], cwd=project, env=bench_env())


def _preprocess(project: Path) -> dict:
    child = run_child([PYTHON, "-c", CHILD], cwd=project, env=bench_env())
    timing = next(line for line in child.output.splitlines() if line.startswith(MARK))
    values = dict(part.split("=") for part in timing.split()[1:])
    decoded, cached = map(int, COUNTS.search(child.output).groups())
    digest = hashlib.sha256()
    for path in sorted((project / "data" / "processed").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return {"seconds": child.seconds, "work": float(values["work"]), "imports": float(values["imports"]),
            "peak_mb": int(values["vmhwm_kb"]) / 1024, "decoded": decoded, "cached": cached,
            "digest": digest.hexdigest()}


def run(ctx: Context) -> list[Figure]:
    base = QUICK_IMAGES if ctx.quick else FULL_IMAGES
    new = base // 10
    grown = base + new
    project = make_project(ctx.folder("incremental") / "project", SCRATCH_DEFAULTS)
    cache = project / ".dvc" / "cache" / "anomaly-preprocess"
    warm = ctx.folder("incremental") / "warm-cache"

    # the snapshot so far: OLD_BATCHES batches of base images; tonight's: one batch of base/10
    old = [(f"batch-{n:04d}", n, base // OLD_BATCHES + (n <= base % OLD_BATCHES)) for n in range(1, OLD_BATCHES + 1)]
    tonight = f"batch-{OLD_BATCHES + 1:04d}"
    _generate(project / "data" / "landing", [*old, (tonight, OLD_BATCHES + 1, new)], ctx.log)
    _pipeline(project, "ingest", "validate")
    # last night's preprocess, which left the cache warm with the old images: the stage run on
    # the validated manifest without tonight's rows (what validate wrote last night, less the
    # columns computed over the whole snapshot, which preprocess does not read)
    import pandas as pd

    manifest = project / "data" / "manifest.parquet"
    grown_manifest = manifest.read_bytes()
    frame = pd.read_parquet(manifest)
    frame[frame["batch"] != tonight].to_parquet(manifest, index=False)
    night = _preprocess(project)
    manifest.write_bytes(grown_manifest)
    assert (night["decoded"], night["cached"]) == (base, 0), night
    shutil.copytree(cache, warm)
    ctx.log(f"  set-up: last night's preprocess of {base} images took {night['seconds']:.1f} s; "
            f"tonight {new} more")

    full, incremental = [], []
    for repetition in range(ctx.repeats):
        shutil.rmtree(cache, ignore_errors=True)
        full.append(_preprocess(project))
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(warm, cache)
        incremental.append(_preprocess(project))
        f, i = full[-1], incremental[-1]
        ctx.log(f"  repetition {repetition + 1}: full {f['seconds']:.2f} s (stage {f['work']:.2f} s, decoded "
                f"{f['decoded']}), incremental {i['seconds']:.2f} s (stage {i['work']:.2f} s, decoded {i['decoded']}, "
                f"from the cache {i['cached']})")
        assert (f["decoded"], f["cached"]) == (grown, 0), f
        assert (i["decoded"], i["cached"]) == (new, base), i
        assert f["digest"] == i["digest"], "the incremental output differs from the full one"
    shutil.rmtree(cache, ignore_errors=True)

    def of(runs: list[dict], field: str) -> list[float]:
        return [run[field] for run in runs]

    startup = [run["seconds"] - run["work"] for run in full + incremental]
    return [
        check(Figure("incremental.ratio", "incremental / full preprocess, whole process", "x",
                     ratios(of(incremental, "seconds"), of(full, "seconds")), higher_is_better=False,
                     note=f"{grown} images, {new} new"), at_most=TARGET),
        check(Figure("incremental.stage_ratio", "incremental / full preprocess, stage after its imports", "x",
                     ratios(of(incremental, "work"), of(full, "work")), higher_is_better=False), at_most=TARGET),
        Figure("incremental.full_seconds", "full preprocess (process)", "s", of(full, "seconds"),
               higher_is_better=False),
        Figure("incremental.incremental_seconds", "incremental preprocess (process)", "s",
               of(incremental, "seconds"), higher_is_better=False),
        Figure("incremental.full_images_per_s", "full preprocess, snapshot images per second (process)", "images/s",
               [grown / s for s in of(full, "seconds")], higher_is_better=True),
        Figure("incremental.incremental_images_per_s", "incremental preprocess, snapshot images per second (process)",
               "images/s", [grown / s for s in of(incremental, "seconds")], higher_is_better=True),
        Figure("incremental.full_stage_images_per_s", "full preprocess, images per second (stage)", "images/s",
               [grown / s for s in of(full, "work")], higher_is_better=True),
        Figure("incremental.incremental_stage_images_per_s", "incremental preprocess, images per second (stage)",
               "images/s", [grown / s for s in of(incremental, "work")], higher_is_better=True),
        Figure("incremental.startup_seconds", "process start-up and imports (process - stage)", "s", startup,
               higher_is_better=False),
        Figure("incremental.full_peak_mb", "full preprocess, peak memory (VmHWM)", "MB", of(full, "peak_mb"),
               higher_is_better=False),
        Figure("incremental.incremental_peak_mb", "incremental preprocess, peak memory (VmHWM)", "MB",
               of(incremental, "peak_mb"), higher_is_better=False),
    ]
