"""Tables at telemetry and fraud-team scale (issue 22): validation per cell at 10, 100 and
1,000 columns, a night of 1M rows on 90 nights of history, and the wide export end to end.

Everything runs the real stages in fresh processes (``python -m pipeline <stage>``) in
scratch projects made by tests.scratch.make_project with ``data.kind: table``, so the
harness measures whatever validation the code has (it is written against the stage
interface only: the files in the raw snapshot folder, params.yaml, the stage's exit status,
its peak memory). Batch files are written straight into the snapshot folder (``paths.raw``,
what ingest would copy there): ingest is not what is measured.

(a) **Validation per cell.** Numeric columns only (each N(mean, scale), declared with a
    range), a string key and a 0/1 label (every 20th row), one Parquet batch. The same number of
    cells at every width (20M: 2M rows x 10, 200k x 100, 20k x 1,000; quick: 200k cells),
    validated in rounds (10, 100, 1000, 10, ...; three rounds in full mode). Each repetition
    runs with validate's store of per-batch statistics off
    (``ANOMALY_PIPELINE_TABLE_STATS_CACHE=off``): every repetition reads its rows. Per million cells is
    taken on the stage *after its imports* (``pipeline.cli.main(["validate"])`` timed inside
    the child, pandas, pyarrow, Great Expectations and the stage's modules imported first:
    only what the stage imports anyway, so the whole child still times the stage's process):
    the interpreter's start-up and imports are a fixed cost that would hide the per-cell one at
    the small sizes. Flatness = max/min of the three widths' per-million-cell figures within a
    round (target <= 1.5). Separately, 1,000 columns x 100k rows (quick: 1,000 rows) validated
    by ``python -m pipeline validate`` as a whole process (target <= 60 s: a wall-clock target
    is taken on the fresh process).

(b) **A night of a fraud team.** One night of ``components.tables.generate_transactions``
    (1M rows, seed 7; quick: 2,000 rows) is generated once; every night is that table with
    its ``transaction_id`` prefixed by the night (``n001-...``: unique across nights), written
    as Parquet ``night-001.parquet`` .. ``night-091.parquet``. params: the transactions schema
    (params.yaml's table section), ``table.drift.window`` at its default, and, where the config
    knows them, ``table.train_batches: 30``, ``table.rows_per_batch: 20000`` and
    ``table.rows_per_run: 20000`` (both nights train on as many rows: the ratio is what the
    history costs, not a larger training set; the config refuses unknown keys: before they
    exist the benchmark runs without them and says so).
    *night 1*: a project whose snapshot holds night-001 only. *night 90*: a project holding
    night-001..night-090, validated once untimed ("history first seen", its time reported),
    then night-091 added. Each timed repetition runs ``validate`` then ``preprocess``, each in
    a fresh process; the figure is their sum (whole processes), the peak RSS the larger of the
    two children's VmHWM. Repetitions alternate night 1, night 90, night 1, ... and the ratio
    pairs them. Before each repetition tonight's file (night-001 in the first project,
    night-091 in the second) is written afresh with ids tagged by the repetition, so its content
    is new to validate's store of per-batch statistics, as a new night's is; the history keeps
    its files untouched. Targets: night 90 <= 180 s, peak RSS <= 2 GB,
    night 90 / night 1 <= 1.2.

(c) **The wide export of the issue, end to end.** 800 numeric sensor-like columns (300
    constant, 460 Gaussian with per-column mean and scale spanning five decades, 40 correlated
    with another column), 500 labelled rows, 5 % anomalies (3-6 non-constant sensors off by 6-10
    standard deviations), one CSV batch in the landing folder; ``python -m pipeline run``
    (model deep_sad, params.yaml's training) as a child, its output read line by line as it
    comes: a stage runs from DVC's ``Running stage 'x'`` to DVC's lock-file line after it;
    what follows ``dvc repro`` (dvc push, register, promote) is one figure. PerformanceWarning
    lines in the output are counted (target 0). Check: validate / the largest other stage
    (target < 1: validation is no longer the largest stage).

Children that run past TIMEOUT_S (env ``BENCH_TABLE_TIMEOUT_S``) or whose process tree's RSS
passes MEMORY_CAP_MB (env ``BENCH_TABLE_MEMORY_CAP_MB``: the machine is shared) are killed; the
figure then records the bound it hit (a lower bound) and says so in its note, and the
measurement is not repeated.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import PYTHON, Context, Figure, bench_env, check, ratios

TITLE = "9. Tables at scale: validation per cell by width, a 1M-row night on 90 nights of history, an 800-column export"

# (a)
CELLS = 20_000_000
QUICK_CELLS = 400_000         # 1000 x 400: 20 labelled anomalies (validate.min_anomalies is 10)
WIDTHS = (10, 100, 1000)
WIDE_COLUMNS, WIDE_ROWS = 1000, 100_000
QUICK_WIDE_ROWS = 1_000
FLATNESS_LIMIT = 1.5
WIDE_LIMIT_S = 60.0
# (b)
NIGHT_ROWS = 1_000_000
QUICK_NIGHT_ROWS = 2_000
NIGHTS = 91                   # night 1 .. night 91: "night 90" has 91 batches present
QUICK_NIGHTS = 5
NIGHT_LIMIT_S = 180.0
NIGHT_RATIO_LIMIT = 1.2
MEMORY_LIMIT_MB = 2048
TRAIN_BATCHES, ROWS_PER_BATCH, ROWS_PER_RUN = 30, 20_000, 20_000
QUICK_TRAIN_BATCHES, QUICK_ROWS_PER_BATCH, QUICK_ROWS_PER_RUN = 3, 500, 500
# (c)
EXPORT_COLUMNS, EXPORT_CONSTANT, EXPORT_CORRELATED = 800, 300, 40
QUICK_EXPORT_COLUMNS, QUICK_EXPORT_CONSTANT, QUICK_EXPORT_CORRELATED = 80, 30, 4
EXPORT_ROWS, EXPORT_ANOMALY_SHARE = 500, 0.05
# guards
TIMEOUT_S = float(os.environ.get("BENCH_TABLE_TIMEOUT_S", 1800))
MEMORY_CAP_MB = float(os.environ.get("BENCH_TABLE_MEMORY_CAP_MB", 8192))
POLL_S = 0.1
MARK = "TABLE-SCALE-TIMING"

NEW_KEYS = ("train_batches", "rows_per_batch", "rows_per_run")  # table keys of issue 22; the config refuses unknown keys

NOTES = f"""\
(a) numeric columns + key + label, {CELLS // 10**6}M cells at each width (quick {QUICK_CELLS // 1000}k), one Parquet
batch; *per million cells* is `pipeline.cli.main(["validate"])` timed inside a fresh child after its imports
(pandas, pyarrow, Great Expectations, the stage's modules), *process* is the whole `python -m pipeline validate`;
flatness = max/min of the three widths within one round. Every repetition runs with validate's statistics store off
(it reads its rows). (b) one night of `generate_transactions` ({NIGHT_ROWS:,} rows) tiled with fresh keys into
{NIGHTS} Parquet nights; night 1 = snapshot of night-001 only, night {NIGHTS - 1} = night-001..{NIGHTS:03d} after
night-001..{NIGHTS - 1:03d} were validated once (*history first seen*, untimed); each figure is validate + preprocess,
two fresh processes; peak RSS = the larger VmHWM; tonight's file is written afresh (new ids, new content) before each repetition; run
alternately (1, {NIGHTS - 1}, 1, {NIGHTS - 1}, ...). params: `table.train_batches: {TRAIN_BATCHES}`,
`table.rows_per_batch: {ROWS_PER_BATCH:,}` and `table.rows_per_run: {ROWS_PER_RUN:,}` when the config has them (the
figure's note says when it did not): both nights train on the same number of rows, so the ratio is what the history
costs.
(c) {EXPORT_COLUMNS} columns ({EXPORT_CONSTANT} constant, {EXPORT_CORRELATED} correlated), {EXPORT_ROWS} labelled rows,
{EXPORT_ANOMALY_SHARE:.0%} anomalies, one CSV; `python -m pipeline run` (deep_sad); stage seconds from DVC's
`Running stage` line to its lock-file line (process start-up and imports included); *after repro* is dvc push,
register and promote. A child past {TIMEOUT_S:.0f} s or {MEMORY_CAP_MB:.0f} MB RSS is killed: its figure is then that
bound (a lower bound), noted.
"""

CHILD = f"""
import importlib, sys, time
started = time.perf_counter()
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:  # a module of another version of the code
        pass
imported = time.perf_counter()
from pipeline.cli import main
code = main([sys.argv[1]])
worked = time.perf_counter() - imported
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("{MARK} imports=%.6f work=%.6f vmhwm_kb=%d" % (imported - started, worked, peak_kb), flush=True)
raise SystemExit(code)
"""
# what each table stage imports anyway, taken before the timed part (missing ones are skipped):
# the whole process's time must stay that of `python -m pipeline <stage>`, so preprocess does
# not get validate's Great Expectations
COMMON_IMPORTS = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "pyarrow.compute", "pipeline.config",
                  "pipeline.layout", "pipeline.kinds.table", "components.tables", "detector.transform")
STAGE_IMPORTS = {
    "validate": (*COMMON_IMPORTS, "great_expectations", "pipeline.stages.validate", "components.validation",
                 "components.table_stats", "pipeline.table_stats"),
    "preprocess": (*COMMON_IMPORTS, "pipeline.stages.preprocess"),
}


# ---------------------------------------------------------------- children

@dataclass
class Child:
    seconds: float
    returncode: int | None
    output: str
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, line)
    killed: str = ""             # "" | "timeout" | "memory"
    peak_tree_mb: float = 0.0    # the process tree's RSS, sampled every POLL_S


def _tree_rss_mb(process) -> float:
    import psutil

    total = 0
    try:
        for member in [process, *process.children(recursive=True)]:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total / 2**20


def spawn(command: list[str], cwd: Path, env: dict, timeout: float = TIMEOUT_S,
          cap_mb: float = MEMORY_CAP_MB) -> Child:
    """Run ``command`` to its end, its output read line by line with timestamps; killed (its
    process group) past ``timeout`` seconds or ``cap_mb`` MB of the tree's RSS."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    child = Child(0.0, None, "")
    watched = psutil.Process(process.pid)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            rss = _tree_rss_mb(watched)
            child.peak_tree_mb = max(child.peak_tree_mb, rss)
            reason = "timeout" if time.perf_counter() - started > timeout else "memory" if rss > cap_mb else ""
            if reason:
                child.killed = reason
                try:
                    os.killpg(process.pid, 9)
                except ProcessLookupError:
                    pass
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert process.stdout is not None
    for line in process.stdout:
        child.lines.append((time.perf_counter() - started, line.rstrip("\n")))
    process.wait()
    done.set()
    watcher.join()
    child.seconds = time.perf_counter() - started
    child.returncode = process.returncode
    child.output = "\n".join(line for _, line in child.lines)
    return child


@dataclass
class StageRun:
    seconds: float         # the whole child process
    work: float            # the stage after its imports (seconds; the bound when killed)
    peak_mb: float         # VmHWM of the child (the sampled tree RSS when killed)
    warnings: int          # PerformanceWarning lines
    killed: str = ""


def run_stage(stage: str, project: Path, **env: str) -> StageRun:
    """``pipeline <stage>`` in a fresh child (CHILD), with its time after imports and its VmHWM."""
    child = spawn([PYTHON, "-c", CHILD, stage, *STAGE_IMPORTS[stage]], project, bench_env(**env))
    warnings = child.output.count("PerformanceWarning")
    if child.killed:  # its time so far is the bound; its memory, the tree's sampled peak
        return StageRun(child.seconds, child.seconds, child.peak_tree_mb, warnings, child.killed)
    if child.returncode != 0:
        raise RuntimeError(f"pipeline {stage} exited {child.returncode}:\n{child.output[-3000:]}")
    timing = next(line for line in child.output.splitlines() if line.startswith(MARK))
    values = dict(part.split("=") for part in timing.split()[1:])
    return StageRun(child.seconds, float(values["work"]), int(values["vmhwm_kb"]) / 1024, warnings)


def killed_note(runs) -> str:
    reasons = sorted({r.killed for r in runs if r.killed})
    if not reasons:
        return ""
    words = {"timeout": f"killed at the {TIMEOUT_S:.0f} s timeout",
             "memory": f"killed at the {MEMORY_CAP_MB:.0f} MB memory cap"}
    return "; ".join(words[r] for r in reasons) + ": a lower bound"


# ---------------------------------------------------------------- projects and data

def table_project(root: Path, params: dict, columns: dict | None = None) -> Path:
    """A scratch project with ``data.kind: table``; ``columns`` replaces table.columns whole
    (make_project merges dicts key by key, which would keep the transactions' columns)."""
    import yaml

    from tests.scratch import deep_update, make_project

    project = make_project(root, deep_update({"data": {"kind": "table"}, "model": {"type": "deep_sad"}}, params))
    if columns is not None:
        merged = yaml.safe_load((project / "params.yaml").read_text())
        merged["table"]["columns"] = columns
        (project / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qam",
                        "table columns"], cwd=project, check=True, capture_output=True)
    return project


def raw_folder(project: Path) -> Path:
    """The snapshot folder (params' paths.raw), as the stages find it."""
    import yaml

    folder = project / yaml.safe_load((project / "params.yaml").read_text())["paths"]["raw"]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# (a) measures reading rows: validate's store of per-batch statistics (pipeline/table_stats.py,
# found by the files' content) would answer every repetition after the first
NO_STORE = {"ANOMALY_PIPELINE_TABLE_STATS_CACHE": "off"}


def numeric_table(path: Path, rows: int, width: int, seed: int, chunk_cells: int = 5_000_000) -> None:
    """``rows`` x ``width`` numeric columns (x0000.., each N(mean, scale)), key ``id``, label
    ``label`` (every 20th row: 5 % ones), written as Parquet in row groups of ``chunk_cells`` cells (the
    generator's memory is one group)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    means, scales = rng.normal(0, 10, width), 10 ** rng.uniform(-1, 1, width)
    step = max(1, chunk_cells // width)
    writer = None
    try:
        for start in range(0, rows, step):
            n = min(step, rows - start)
            values = rng.standard_normal((n, width)) * scales + means
            ids = pc.binary_join_element_wise("r", pa.array(np.arange(start, start + n)).cast(pa.string()), "")
            columns = {"id": ids, "label": pa.array((np.arange(start, start + n) % 20 == 0).astype(np.int64))}
            columns.update({f"x{j:04d}": pa.array(values[:, j]) for j in range(width)})
            table = pa.table(columns)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def numeric_columns(width: int, seed: int) -> dict:
    """numeric_table's columns as params declare them: a range wide enough for the data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    means, scales = rng.normal(0, 10, width), 10 ** rng.uniform(-1, 1, width)
    return {f"x{j:04d}": {"type": "numeric", "min": round(float(m - 50 * s), 3), "max": round(float(m + 50 * s), 3)}
            for j, (m, s) in enumerate(zip(means, scales))}


NUMERIC_TABLE = {"table": {"key_column": "id", "label_column": "label"}}


# ---------------------------------------------------------------- (a) validation per cell

def width_label(width: int, rows: int) -> str:
    return f"{width} x {rows // 1000}k" if rows >= 1000 and rows % 1000 == 0 else f"{width} x {rows}"


def per_cell(ctx: Context) -> list[Figure]:
    cells = QUICK_CELLS if ctx.quick else CELLS
    rounds = 1 if ctx.quick else min(3, ctx.repeats)
    projects = {}
    for width in WIDTHS:
        rows = cells // width
        project = table_project(ctx.folder(f"cells-{width}") / "project", NUMERIC_TABLE, numeric_columns(width, width))
        started = time.perf_counter()
        numeric_table(raw_folder(project) / "batch-0001.parquet", rows, width, seed=width)
        ctx.log(f"  (a) set-up: {width_label(width, rows)} written in {time.perf_counter() - started:.1f} s")
        projects[width] = project
    os.sync()
    runs: dict[int, list[StageRun]] = {width: [] for width in WIDTHS}
    flatness = []
    for round_ in range(rounds):
        for width in WIDTHS:
            if runs[width] and runs[width][-1].killed:
                continue  # a killed child is not repeated: its bound stands
            r = run_stage("validate", projects[width], **NO_STORE)
            runs[width].append(r)
            ctx.log(f"  (a) round {round_ + 1}, {width} columns: validate {r.seconds:.1f} s (stage {r.work:.2f} s), "
                    f"{r.work / cells * 1e6:.3f} s per M cells, peak {r.peak_mb:.0f} MB, "
                    f"{r.warnings} PerformanceWarning lines{' KILLED: ' + r.killed if r.killed else ''}")
        if all(len(runs[w]) == round_ + 1 for w in WIDTHS):
            per_m = [runs[w][-1].work / cells * 1e6 for w in WIDTHS]
            flatness.append(max(per_m) / min(per_m))

    wide_rows = QUICK_WIDE_ROWS if ctx.quick else WIDE_ROWS
    wide = table_project(ctx.folder("cells-wide") / "project", NUMERIC_TABLE, numeric_columns(WIDE_COLUMNS, 1))
    numeric_table(raw_folder(wide) / "batch-0001.parquet", wide_rows, WIDE_COLUMNS, seed=1)
    os.sync()
    wide_runs = []
    for _ in range(rounds):
        wide_runs.append(run_stage("validate", wide, **NO_STORE))
        r = wide_runs[-1]
        ctx.log(f"  (a) {width_label(WIDE_COLUMNS, wide_rows)}: validate {r.seconds:.1f} s (stage {r.work:.1f} s), "
                f"peak {r.peak_mb:.0f} MB{' KILLED: ' + r.killed if r.killed else ''}")
        if r.killed:
            break
    for width in WIDTHS:
        shutil.rmtree(projects[width].parent, ignore_errors=True)
    shutil.rmtree(wide.parent, ignore_errors=True)

    figures = []
    for width in WIDTHS:
        at, note = width_label(width, cells // width), killed_note(runs[width])
        figures += [
            Figure(f"table_scale.validate_s_per_mcell.w{width}", f"validate per million cells, {at} (stage)",
                   "s/Mcell", [r.work / cells * 1e6 for r in runs[width]], higher_is_better=False,
                   note=note or "after imports"),
            Figure(f"table_scale.validate_process_s.w{width}", f"validate, {at} (process)", "s",
                   [r.seconds for r in runs[width]], higher_is_better=False, note=note),
            Figure(f"table_scale.validate_peak_mb.w{width}", f"validate peak RSS, {at}", "MB",
                   [r.peak_mb for r in runs[width]], higher_is_better=False, note=note),
        ]
    killed_any = any(r.killed for w in WIDTHS for r in runs[w])
    figures += [
        check(Figure("table_scale.validate_per_cell_flatness", f"validate per cell, max/min over {', '.join(map(str, WIDTHS))} columns",
                     "x", flatness, higher_is_better=False,
                     note="a child was killed: no figure" if killed_any and not flatness else ""),
              at_most=FLATNESS_LIMIT),
        check(Figure("table_scale.validate_1000_columns_s", f"validate {width_label(WIDE_COLUMNS, wide_rows)} (process)", "s",
                     [r.seconds for r in wide_runs], higher_is_better=False, note=killed_note(wide_runs)),
              at_most=WIDE_LIMIT_S),
        Figure("table_scale.validate_1000_columns_peak_mb", f"validate {width_label(WIDE_COLUMNS, wide_rows)} peak RSS", "MB",
               [r.peak_mb for r in wide_runs], higher_is_better=False, note=killed_note(wide_runs)),
        check(Figure("table_scale.validate_performance_warnings", f"PerformanceWarning lines, validate at {WIDTHS[-1]} and {WIDE_COLUMNS} columns",
                     "lines", [float(r.warnings) for r in runs[WIDTHS[-1]] + wide_runs]), at_most=0),
    ]
    return figures


# ---------------------------------------------------------------- (b) a night on 90 nights of history

def new_keys_known() -> bool:
    from pipeline.config import Table

    return all(name in Table.model_fields for name in NEW_KEYS)


def write_nights(night, folders: dict[int, Path], tag: str = "") -> float:
    """Night ``n`` (1-based) into ``folders[n]/night-<n>.parquet``: ``night`` (a pyarrow
    table) with its transaction ids prefixed by the night (and ``tag``: other ids make other
    content, new to validate's store of per-batch statistics, as a new night is)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    started = time.perf_counter()
    position = night.schema.get_field_index("transaction_id")
    ids = night.column(position).cast(pa.string())  # pandas' strings arrive as large_string
    for n, folder in folders.items():
        keys = pc.binary_join_element_wise(f"n{n:03d}{tag}-", ids, "")
        pq.write_table(night.set_column(position, "transaction_id", keys), folder / f"night-{n:03d}.parquet")
    return time.perf_counter() - started


@dataclass
class NightRun:
    validate: StageRun
    preprocess: StageRun | None

    @property
    def seconds(self) -> float:
        return self.validate.seconds + (self.preprocess.seconds if self.preprocess else 0.0)

    @property
    def work(self) -> float:
        return self.validate.work + (self.preprocess.work if self.preprocess else 0.0)

    @property
    def peak_mb(self) -> float:
        return max(self.validate.peak_mb, self.preprocess.peak_mb if self.preprocess else 0.0)

    @property
    def killed(self) -> str:
        return self.validate.killed or (self.preprocess.killed if self.preprocess else "")


def night_run(project: Path, night, number: int, repetition: int) -> NightRun:
    """Tonight's file written afresh, with ids of this repetition (so its content is new to
    validate's store, as a new night's is), then validate and preprocess."""
    write_nights(night, {number: raw_folder(project)}, tag=f"r{repetition}")
    validate = run_stage("validate", project)
    if validate.killed:
        return NightRun(validate, None)
    return NightRun(validate, run_stage("preprocess", project))


def nights(ctx: Context) -> list[Figure]:
    import pyarrow as pa

    from components.tables import generate_transactions

    rows = QUICK_NIGHT_ROWS if ctx.quick else NIGHT_ROWS
    count = QUICK_NIGHTS if ctx.quick else NIGHTS
    known = new_keys_known()
    table = {"drift": {"window": 30}}  # params.yaml's default, stated
    if known:
        table.update(train_batches=QUICK_TRAIN_BATCHES if ctx.quick else TRAIN_BATCHES,
                     rows_per_batch=QUICK_ROWS_PER_BATCH if ctx.quick else ROWS_PER_BATCH,
                     rows_per_run=QUICK_ROWS_PER_RUN if ctx.quick else ROWS_PER_RUN)
    else:
        ctx.log(f"  (b) the config has no table.{' or table.'.join(NEW_KEYS)} yet: run without them")
    params = {"table": table}
    first = table_project(ctx.folder("night-1") / "project", params)
    history = table_project(ctx.folder("night-n") / "project", params)

    started = time.perf_counter()
    night = pa.Table.from_pandas(generate_transactions(rows, 7, "night"), preserve_index=False)
    generated = time.perf_counter() - started
    # the history is written straight into its snapshot; tonight's file afresh before each repetition
    written = write_nights(night, {n: raw_folder(history) for n in range(1, count)})
    ctx.log(f"  (b) set-up: one night of {rows:,} transactions generated in {generated:.1f} s, "
            f"{count} nights written in {written:.1f} s")
    os.sync()

    seen = run_stage("validate", history)  # the history seen once: what the nights before did
    ctx.log(f"  (b) history first seen: validate of nights 1-{count - 1} in {seen.seconds:.1f} s "
            f"(stage {seen.work:.1f} s), peak {seen.peak_mb:.0f} MB{' KILLED: ' + seen.killed if seen.killed else ''}")

    ones, lasts = [], []
    for repetition in range(1 if ctx.quick else min(3, ctx.repeats)):
        if not (ones and ones[-1].killed):
            ones.append(night_run(first, night, 1, repetition))
        if not (lasts and lasts[-1].killed):
            lasts.append(night_run(history, night, count, repetition))
        for name, runs in (("night 1", ones), (f"night {count - 1}", lasts)):
            r = runs[-1]
            ctx.log(f"  (b) repetition {repetition + 1}, {name}: {r.seconds:.1f} s (validate {r.validate.seconds:.1f}"
                    f" s, preprocess {r.preprocess.seconds if r.preprocess else float('nan'):.1f} s; stages after "
                    f"imports {r.work:.1f} s), peak {r.peak_mb:.0f} MB{' KILLED: ' + r.killed if r.killed else ''}")
        if ones[-1].killed and lasts[-1].killed:
            break
    for folder in (first.parent, history.parent):
        shutil.rmtree(folder, ignore_errors=True)

    last = f"night {count - 1}"
    keys = "" if known else f"without table.{' and table.'.join(NEW_KEYS)} (not in this config yet)"
    one_note, last_note = killed_note(ones), killed_note(lasts)
    paired = [(a, b) for a, b in zip(lasts, ones) if not a.killed and not b.killed]
    return [
        Figure("table_scale.night_generate_s", f"generating one night of {rows:,} transactions (set-up)", "s",
               [generated], higher_is_better=False, note="untimed set-up, for planning"),
        Figure("table_scale.history_first_seen_s", f"history first seen: validate of {count - 1} nights", "s",
               [seen.seconds], higher_is_better=False, note=killed_note([seen]) or "untimed warm-up"),
        Figure("table_scale.night_1_s", f"night 1 ({rows:,} rows, 1 batch): validate + preprocess", "s",
               [r.seconds for r in ones], higher_is_better=False, note=one_note or keys),
        check(Figure("table_scale.night_last_s", f"{last} ({count} batches): validate + preprocess", "s",
                     [r.seconds for r in lasts], higher_is_better=False, note=last_note or keys),
              at_most=NIGHT_LIMIT_S),
        Figure("table_scale.night_last_validate_s", f"{last}: validate", "s",
               [r.validate.seconds for r in lasts], higher_is_better=False, note=last_note),
        Figure("table_scale.night_last_preprocess_s", f"{last}: preprocess", "s",
               [r.preprocess.seconds for r in lasts if r.preprocess], higher_is_better=False),
        check(Figure("table_scale.night_ratio", f"{last} / night 1, validate + preprocess (process)", "x",
                     ratios([a.seconds for a, _ in paired], [b.seconds for _, b in paired]),
                     higher_is_better=False, note="a night was killed: no pair" if not paired else "paired runs"),
              at_most=NIGHT_RATIO_LIMIT),
        Figure("table_scale.night_stage_ratio", f"{last} / night 1, stages after their imports", "x",
               ratios([a.work for a, _ in paired], [b.work for _, b in paired]), higher_is_better=False),
        check(Figure("table_scale.night_1_peak_mb", "night 1: peak RSS (larger of the two stages)", "MB",
                     [r.peak_mb for r in ones], higher_is_better=False, note=one_note), at_most=MEMORY_LIMIT_MB),
        check(Figure("table_scale.night_last_peak_mb", f"{last}: peak RSS (larger of the two stages)", "MB",
                     [r.peak_mb for r in lasts], higher_is_better=False, note=last_note), at_most=MEMORY_LIMIT_MB),
    ]


# ---------------------------------------------------------------- (c) the wide export end to end

def wide_export(rows: int, width: int, constant: int, correlated: int, seed: int = 22):
    """(frame, columns for params): sensor-like readings, ``constant`` columns fixed, the
    others N(mean, scale) with scales over five decades, ``correlated`` of them a noisy
    multiple of another; ``EXPORT_ANOMALY_SHARE`` of the rows have 3-6 varying sensors off
    by 6-10 standard deviations (label 1)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    varying = width - constant
    means, scales = rng.normal(0, 50, varying), 10 ** rng.uniform(-2, 3, varying)
    values = rng.standard_normal((rows, varying))
    sources = rng.integers(0, varying - correlated, correlated)
    for offset, source in enumerate(sources):
        column = varying - correlated + offset
        values[:, column] = 0.9 * values[:, source] + 0.1 * values[:, column]
    anomalous = rng.choice(rows, size=max(1, round(rows * EXPORT_ANOMALY_SHARE)), replace=False)
    for row in anomalous:
        off = rng.choice(varying, size=int(rng.integers(3, 7)), replace=False)
        values[row, off] += rng.choice([-1.0, 1.0], size=off.size) * rng.uniform(6, 10, off.size)
    readings = values * scales + means
    levels = np.round(rng.uniform(0, 100, constant), 1)
    frame = pd.DataFrame({"reading_id": [f"r{i:05d}" for i in range(rows)]})
    names = [f"sensor_{j:03d}" for j in range(width)]
    order = rng.permutation(width)  # constant and varying columns interleaved, as an export has them
    data, columns = {}, {}
    for position, j in enumerate(order):
        name = names[position]
        if j < constant:
            data[name] = np.full(rows, levels[j])
            columns[name] = {"type": "numeric", "min": 0, "max": 1000}
        else:
            k = j - constant
            data[name] = np.round(readings[:, k], 4)
            low, high = means[k] - 40 * scales[k], means[k] + 40 * scales[k]
            columns[name] = {"type": "numeric", "min": round(float(low), 3), "max": round(float(high), 3)}
    frame = pd.concat([frame, pd.DataFrame(data)], axis=1)
    label = np.zeros(rows, dtype=np.int64)
    label[anomalous] = 1
    frame["label"] = label
    return frame, columns


STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
LOCK_LINE = re.compile(r"(Generating|Updating) lock file")


def stage_seconds(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Per DVC stage: from its ``Running stage`` line to the lock-file line after it; the rest
    of the run after the last one (dvc push, register, promote) as ``after repro``."""
    seconds: dict[str, float] = {}
    current, since, last_end = None, 0.0, 0.0
    for at, line in lines:
        found = STAGE_LINE.search(line)
        if found:
            current, since = found.group(1), at
        elif current and LOCK_LINE.search(line):
            seconds[current] = at - since
            current, last_end = None, at
    if current:  # the run stopped inside a stage
        seconds[current] = total - since
    else:
        seconds["after repro"] = total - last_end
    return seconds


def end_to_end(ctx: Context) -> list[Figure]:
    width = QUICK_EXPORT_COLUMNS if ctx.quick else EXPORT_COLUMNS
    constant = QUICK_EXPORT_CONSTANT if ctx.quick else EXPORT_CONSTANT
    correlated = QUICK_EXPORT_CORRELATED if ctx.quick else EXPORT_CORRELATED
    frame, columns = wide_export(EXPORT_ROWS, width, constant, correlated)
    params = {"table": {"key_column": "reading_id", "label_column": "label"}}
    if ctx.quick:
        params["train"] = {"epochs": 2}
    project = table_project(ctx.folder("export") / "project", params, columns)
    landing = project / "data" / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    frame.to_csv(landing / "export-0001.csv", index=False)
    child = spawn([PYTHON, "-m", "pipeline", "run"], project, bench_env(PYTHONUNBUFFERED="1"))
    if child.returncode != 0 and not child.killed:
        raise RuntimeError(f"pipeline run exited {child.returncode}:\n{child.output[-3000:]}")
    seconds = stage_seconds(child.lines, child.seconds)
    warnings = child.output.count("PerformanceWarning")
    ctx.log(f"  (c) {width} columns x {EXPORT_ROWS} rows: pipeline run {child.seconds:.1f} s"
            f"{' KILLED: ' + child.killed if child.killed else ''}; "
            + ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
            + f"; {warnings} PerformanceWarning lines; peak tree RSS {child.peak_tree_mb:.0f} MB")
    shutil.rmtree(project.parent, ignore_errors=True)

    note = (f"killed: {child.killed}, a lower bound" if child.killed else "")
    others = [s for name, s in seconds.items() if name not in ("validate", "after repro")]
    figures = [Figure("table_scale.export_run_s", f"pipeline run, {width} columns x {EXPORT_ROWS} rows", "s",
                      [child.seconds], higher_is_better=False, note=note)]
    for name, s in seconds.items():
        key = name.replace(" ", "_")
        figures.append(Figure(f"table_scale.export_stage_s.{key}", f"export run: {name}", "s", [s],
                              higher_is_better=False, note="dvc push, register, promote" if name == "after repro"
                              else ""))
    figures += [
        check(Figure("table_scale.export_validate_over_largest_other", "export run: validate / largest other stage",
                     "x", [seconds["validate"] / max(others)] if "validate" in seconds and others else [],
                     higher_is_better=False, note=note or "< 1: validation is not the largest stage"),
              at_most=1.0),
        check(Figure("table_scale.export_performance_warnings", "export run: PerformanceWarning lines", "lines",
                     [float(warnings)], higher_is_better=False), at_most=0),
    ]
    return figures


def run(ctx: Context) -> list[Figure]:
    return [*per_cell(ctx), *nights(ctx), *end_to_end(ctx)]
