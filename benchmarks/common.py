"""What every benchmark shares: the figure record, side-by-side ratios, child processes.

Scratch projects are made by tests/scratch.py (make_project), the same maker the tests use.

A benchmark module (benchmarks/<name>.py) has a ``TITLE`` and ``run(ctx) -> list[Figure]``.
Each figure keeps all its samples; results.json and RESULTS.md show the median and the
min-max range. Ratios are computed from repetitions taken side by side in one run (A, B,
A, B, ...), never against a figure from another run: these machines are shared and noisy.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# what preprocess imports (PIL's plugins: what Image.open's first call loads; pyarrow.compute:
# what Table.take loads): a child that times the stage "after its imports" imports these first
PREPROCESS_IMPORTS = ("numpy", "pyarrow.parquet", "pyarrow.compute", "PIL.Image", "PIL.BmpImagePlugin",
                      "PIL.GifImagePlugin", "PIL.JpegImagePlugin", "PIL.PpmImagePlugin", "PIL.PngImagePlugin",
                      "pipeline.config", "pipeline.stages.preprocess")


# The benchmarks of issue 5 (training, scale, incremental preprocess, bf16, quality 7) measure
# the families trained from scratch at 64 px, params.yaml's defaults until patchcore (224 px)
# became the default for images: they pin those settings, so their figures stay comparable
# with the earlier ones. The feature families have benchmarks of their own (surface_quality,
# feature_throughput).
SCRATCH_DEFAULTS = {"model": {"type": "deep_sad"}, "preprocess": {"image_size": 64}}


@dataclass
class Figure:
    """One measured quantity. ``key`` is stable across runs (the before/after column uses it)."""

    key: str
    label: str
    unit: str
    samples: list[float]
    target: str = ""          # in words, e.g. ">= 0.95"; empty: informational
    met: bool | None = None   # None: no target, or not measurable here
    note: str = ""
    higher_is_better: bool | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_dict(self) -> dict:
        record = asdict(self)
        record.update(median=self.median, min=min(self.samples) if self.samples else None,
                      max=max(self.samples) if self.samples else None)
        return record


@dataclass
class Context:
    """What the runner hands each benchmark."""

    quick: bool                       # small sizes and few repetitions: a smoke run, not figures to quote
    repeats: int
    scratch: Path                     # a private folder, removed after the run
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def check(figure: Figure, at_least: float | None = None, at_most: float | None = None) -> Figure:
    """Set target text and met from a bound on the median."""
    if at_least is not None:
        figure.target, figure.met = f">= {at_least:g}", figure.median is not None and figure.median >= at_least
    elif at_most is not None:
        figure.target, figure.met = f"<= {at_most:g}", figure.median is not None and figure.median <= at_most
    return figure


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Pairwise ratios of side-by-side repetitions (the i-th of one against the i-th of the other)."""
    return [a / b for a, b in zip(numerators, denominators) if b]


@dataclass
class ChildRun:
    seconds: float
    returncode: int
    output: str


def run_child(command: Sequence[str], cwd: Path | None = None, env: dict | None = None,
              check_rc: bool = True, timeout: float = 3600) -> ChildRun:
    """Run a command to its end (stdout and stderr together); its wall time and output.

    Peak memory is not taken here: wait4's ru_maxrss starts from the parent's peak at
    fork (Linux keeps it across exec), so benchmarks/scale.py samples /proc instead."""
    started = time.perf_counter()
    done = subprocess.run(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if check_rc and done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return ChildRun(seconds, done.returncode, done.stdout)


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for a child: this venv first on PATH, no tracking URI of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW_CTX_"))}
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONHASHSEED", "0")
    # what `python -m pipeline` sets before pyarrow loads (pipeline/__main__.py); the children
    # that time a stage after its imports call pipeline.cli.main directly, without it
    env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    env.update(extra)
    return env


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def write_batches(landing: Path, batches: Sequence[tuple[str, int, object]]) -> float:
    """components.synthetic.write_batch for each (name, seed, BatchSpec), in parallel children
    (one per core; generating 50k images takes minutes); returns the seconds it took."""
    code = ("import sys; from pathlib import Path; from components.synthetic import BatchSpec, write_batch; "
            "write_batch(Path(sys.argv[1]), sys.argv[2], seed=int(sys.argv[3]), "
            "spec=BatchSpec(n_good=int(sys.argv[4]), n_per_defect=int(sys.argv[5]), size=int(sys.argv[6])))")
    workers = max(1, min(len(batches), os.cpu_count() or 1))
    started = time.perf_counter()
    pending = [[PYTHON, "-c", code, str(landing), name, str(seed), str(spec.n_good), str(spec.n_per_defect),
                str(spec.size)] for name, seed, spec in batches]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < workers:
            running.append(subprocess.Popen(pending.pop(0), cwd=ROOT, env=bench_env()))
        for process in list(running):
            if process.poll() is not None:
                running.remove(process)
                if process.returncode != 0:
                    raise RuntimeError(f"generating images failed: {process.args[3:]}")
        time.sleep(0.05)
    return time.perf_counter() - started
