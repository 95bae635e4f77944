"""Fault 6: two pipelines at once. Two `dvc repro` in one workspace, and two scheduled
runs (each in its own run workspace, both sharing the project's DVC cache, which is
where they could hurt each other) running the same stages at the same time.

Real DVC, real processes. After each, the lock file parses and matches the files on
disk, and every object in the DVC cache still holds the bytes its name (its md5) says.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import DRIVER, clean_env, dvc, make_workspace, start

pytestmark = pytest.mark.slow

VOLATILE = {("validate", "reports/validation/report.html"), ("validate", "reports/validation/gx_result.json"),
            ("train", "reports/train.json")}
STAGES = ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate")





def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def verify_cache(cache: Path) -> int:
    """Every object in a DVC cache holds the bytes its name says, and no partial write is
    left in it; returns the number of objects."""
    objects = [p for p in (cache / "files" / "md5").rglob("*") if p.is_file()]
    assert objects
    for path in objects:
        name = path.parent.name + path.name
        assert len(name.removesuffix(".dir")) == 32, f"not a finished cache object: {path}"
        assert md5(path) == name.removesuffix(".dir"), f"corrupted cache object {path}"
    return len(objects)


def verify_lock(root: Path, cache: Path) -> dict[str, dict[str, str]]:
    """dvc.lock parses, and every output on disk has the md5 the lock records (a folder:
    each file its manifest in the cache lists). Returns {stage: {out path: md5}}."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    recorded: dict[str, dict[str, str]] = {}
    for stage, entry in lock["stages"].items():
        for out in entry.get("outs", []):
            path, digest = root / out["path"], out["md5"]
            recorded.setdefault(stage, {})[out["path"]] = digest
            if digest.endswith(".dir"):
                manifest = json.loads((cache / "files" / "md5" / digest[:2] / digest[2:]).read_text())
                on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                assert on_disk == sorted(item["relpath"] for item in manifest), out["path"]
                for item in manifest:
                    assert md5(path / item["relpath"]) == item["md5"], f"{out['path']}/{item['relpath']}"
            else:
                assert md5(path) == digest, out["path"]
    return recorded


def test_two_dvc_repro_in_one_workspace_the_second_fails_clearly_and_nothing_is_corrupted(tmp_path):
    """While one `dvc repro` trains, a second one in the same workspace stops at once with
    an error that names the lock and the process holding it (DVC's lock on the repository,
    or its lock on the stage's files, depending on the moment; neither waits, not even
    with --wait-for-lock). The first one finishes; a retry afterwards finds everything up
    to date; dvc.lock, the outputs and the cache are consistent."""
    root = make_workspace(tmp_path / "project", {"train": {"epochs": 150, "checkpoint_every_s": 0}})
    dvc(root, "repro", "preprocess")
    log = tmp_path / "first.log"
    first = start(root, [sys.executable, "-m", "dvc", "repro", "train"], log)
    checkpoints = root / "models" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("epoch-*.pt")):  # the first run is inside train
        assert first.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first dvc repro did not start training"
        time.sleep(0.05)

    second = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], cwd=root, env=clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the two runs did not overlap; the test proves nothing"
    assert second.returncode != 0
    held = "Unable to acquire lock" in second.stderr or (
        "is busy, it is being blocked by" in second.stderr and f"(PID {first.pid})" in second.stderr)
    assert held, second.stderr[-2000:]
    assert "Running stage" not in second.stdout

    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    retry = dvc(root, "repro", "train")
    assert "Stage 'train' didn't change, skipping" in retry.stdout and "Running stage" not in retry.stdout
    assert "up to date" in dvc(root, "status", "train").stdout
    cache = root / ".dvc" / "cache"
    recorded = verify_lock(root, cache)
    assert set(recorded) == {"ingest", "validate", "preprocess", "train"}
    verify_cache(cache)


def test_two_scheduled_runs_at_once_share_the_cache_and_both_finish_with_the_same_outputs(tmp_path):
    """Two runs of the retraining (two run ids, two run workspaces, the project's one DVC
    cache and MLflow store) start at the same moment and run every stage: both finish,
    their outputs are identical, and the shared cache is intact."""
    project = make_workspace(tmp_path / "project")
    runs = {"scheduled__a": tmp_path / "a.log", "scheduled__b": tmp_path / "b.log"}
    processes = {run_id: start(project, [sys.executable, "-c", DRIVER, str(project), run_id, *STAGES], log)
                 for run_id, log in runs.items()}
    for run_id, process in processes.items():
        assert process.wait(timeout=900) == 0, runs[run_id].read_text()[-4000:]

    cache = project / ".dvc" / "cache"
    recorded = {run_id: verify_lock(project / "runs" / run_id, cache) for run_id in runs}
    assert set(recorded["scheduled__a"]) == set(STAGES)
    differ = {(stage, path) for stage, outs in recorded["scheduled__a"].items() for path, digest in outs.items()
              if recorded["scheduled__b"][stage][path] != digest}
    # only what records when and how long: GX's report (timestamps), train's timings
    assert differ <= VOLATILE, differ
    timings = [json.loads((project / "runs" / run_id / "reports" / "train.json").read_text()) for run_id in runs]
    for metrics in timings:
        metrics.pop("seconds"), metrics.pop("samples_per_second"), metrics.pop("epoch_seconds")
    assert timings[0] == timings[1]
    for run_id in runs:
        workspace = project / "runs" / run_id
        assert "up to date" in dvc(workspace, "status").stdout
    a, b = (project / "runs" / run_id / "models" / "model.pt" for run_id in runs)
    assert md5(a) == md5(b)
    verify_cache(cache)
