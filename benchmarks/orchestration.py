"""Orchestration cost (issue 5, item 6): what running the retraining through Airflow adds.

1. Airflow vs direct. A whole retraining through Airflow (``python -m pipeline airflow dags
   test retrain_anomaly_detector``, as ``make run`` does: ``dag.test()``, every task in the
   one ``airflow`` process) against the same stages run directly (``python -m pipeline run``:
   ``dvc repro``, register, promote). Each repetition gets two *fresh* scratch projects (the
   same params, the same generated batch), so neither run finds anything in a DVC cache or
   run cache and every repetition does the whole work: the 2nd repetition cannot skip stages.
   Airflow's one-off set-up (``db migrate`` and the ``gpu`` pool, ~30 s) is done once into a
   template AIRFLOW_HOME outside the timed region and copied into each Airflow project; the
   timed region starts at ``airflow dags test`` (Airflow's start-up, DAG parse, DB writes, the
   run's own workspace, and the 8 tasks). Order: Airflow, direct, Airflow, direct, ...
2. Import cost per task. For each task of the retraining DAG, a fresh interpreter does what a
   worker's task process has done before the task starts (import ``airflow.sdk`` and parse the
   DAG file), then calls the task's own Python callable with a task context; ``-X importtime``
   gives the seconds spent importing modules the task pulled in, and ``sys.modules`` which heavy
   libraries it loaded. The validate stage's own process (``python -m pipeline validate``, what
   DVC runs) is checked for torch the same way.
3. DAG folder parse: in a fresh interpreter with ``airflow`` and ``airflow.sdk`` already
   imported, the time of ``DagBag(dags/)`` (examples off), as the DAG processor does and tests/dags do.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import PYTHON, ROOT, Context, Figure, bench_env, check, ratios, run_child
from tests.scratch import make_project

TITLE = "6. Orchestration cost: Airflow vs running the stages directly"
DAG_ID = "retrain_anomaly_detector"
TASKS = ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate", "register", "promote")
HEAVY = ("torch", "mlflow", "great_expectations", "sklearn", "pandas")
# Small and fast, the same in both arms; low gates so that both arms register and promote.
PARAMS = {
    "preprocess": {"image_size": 32},
    "model": {"type": "deep_sad", "width": 8, "latent_dim": 16},
    "train": {"epochs": 2, "batch_size": 32, "num_threads": 1},
    "validate": {"min_good": 10, "min_anomalies": 5},
    "calibration": {"target_fpr": 0.1},
    "gates": {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0},
}
BATCH = {"n_good": 100, "n_per_defect": 10, "size": 64}
QUICK_BATCH = {"n_good": 40, "n_per_defect": 5, "size": 64}
FULL_REPEATS = 3  # one Airflow + one direct run: ~4 min on a quiet 2-core machine, ~7 min under load; 5 pairs
                  # would not fit. Full mode: ~15 min quiet (30 min measured at load 9 on 2 cores).

NOTES = (
    "Airflow vs direct: two fresh scratch projects per repetition (deep_sad width 8, 32 px, 2 epochs, "
    f"{BATCH['n_good']} good + {BATCH['n_per_defect']} per defect kind, 64 px PNGs; gates off), so no DVC "
    "cache is shared and every repetition runs every stage; Airflow's `db migrate` is done once outside the "
    "timed region and copied in. `airflow dags test` runs every task in one process (`dag.test()`), so a "
    "heavy import is paid once per run there; a deployed LocalExecutor/Celery worker pays it in every "
    "task's process, which is what the per-task import figures measure (one fresh interpreter each, after "
    "`import airflow.sdk` and the DAG file, as a worker's task process has done before the task). "
    "The DAG-parse figure excludes Airflow's own import, as the target says."
)


def _env(**extra: str) -> dict[str, str]:
    """bench_env, less a caller's Airflow/project settings (each child here names its own project)."""
    env = bench_env(GIT_PYTHON_REFRESH="quiet", NO_ALBUMENTATIONS_UPDATE="1", **extra)
    for key in ("AIRFLOW_HOME", "ANOMALY_PIPELINE_PROJECT", "ANOMALY_PIPELINE_RUNS", "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return {k: v for k, v in env.items() if not k.startswith("AIRFLOW__")}


def _airflow_env(project: Path, home: Path) -> dict[str, str]:
    """What `python -m pipeline airflow` gives Airflow (pipeline.airflow_local), for this project."""
    from pipeline import airflow_local

    merged = {**airflow_local.env(project, home=home), **_env(), "AIRFLOW_HOME": str(home),
              "ANOMALY_PIPELINE_PROJECT": str(project), "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
              "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    return {k: v for k, v in merged.items() if not k.startswith(("MLFLOW_", "AIRFLOW_CTX_"))}


def _project(root: Path, batch: dict, seed: int = 7) -> Path:
    from components.synthetic import BatchSpec, write_batch

    make_project(root, json.loads(json.dumps(PARAMS)))
    write_batch(root / "data" / "landing", "batch-0001", seed=seed,
                spec=BatchSpec(n_good=batch["n_good"], n_per_defect=batch["n_per_defect"], size=batch["size"]))
    return root


def _airflow_template(ctx: Context) -> Path:
    """An AIRFLOW_HOME migrated once (the db migrate and gpu pool `python -m pipeline airflow` does on
    first use), to copy into each project instead of migrating again in every repetition."""
    project = ctx.folder("airflow-template")
    for name in ("components", "pipeline", "dags"):
        if not (project / name).exists():
            shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")
    started = time.perf_counter()
    run_child([PYTHON, "-m", "pipeline", "airflow", "version"], cwd=project, env=_env(), timeout=600)
    ctx.log(f"  airflow set-up (db migrate, gpu pool), once: {time.perf_counter() - started:.1f} s")
    return project / ".airflow"


def _install_airflow_home(template: Path, project: Path) -> None:
    home = project / ".airflow"
    home.mkdir(parents=True)
    for name in ("airflow.cfg", "airflow.db", ".anomaly-pipeline-initialised"):
        shutil.copy2(template / name, home / name)
    # the generated airflow.cfg holds absolute paths (the SQLite file, logs): point them here
    cfg = home / "airflow.cfg"
    cfg.write_text(cfg.read_text().replace(str(template), str(home)))


def _ran_every_stage(output: str, what: str) -> None:
    missing = [s for s in TASKS[:6] if f"Running stage '{s}'" not in output]
    if missing:
        raise RuntimeError(f"{what}: stages {missing} did not run (cached?); the comparison would be unfair")


def _airflow_vs_direct(ctx: Context) -> tuple[list[Figure], Path]:
    template = _airflow_template(ctx)
    airflow_s, direct_s, inside_s = [], [], []
    last_airflow_project = None
    for i in range(min(ctx.repeats, FULL_REPEATS)):
        a = _project(ctx.folder(f"rep{i}") / "airflow", BATCH)
        _install_airflow_home(template, a)
        b = _project(ctx.folder(f"rep{i}") / "direct", BATCH)
        run = run_child([PYTHON, "-m", "pipeline", "airflow", "dags", "test", DAG_ID], cwd=a, env=_env(),
                        timeout=1200)
        _ran_every_stage(run.output, "airflow")
        if "DagRun Finished" not in run.output or "state=success" not in run.output:
            raise RuntimeError(f"the Airflow run did not succeed:\n{run.output[-3000:]}")
        stage_seconds = [float(x) for x in re.findall(r"^\w+: done in ([\d.]+) s in ", run.output, flags=re.M)]
        airflow_s.append(run.seconds)
        inside_s.append(sum(stage_seconds))
        direct = run_child([PYTHON, "-m", "pipeline", "run"], cwd=b, env=_env(), timeout=1200)
        _ran_every_stage(direct.output, "direct")
        direct_s.append(direct.seconds)
        ctx.log(f"  rep {i + 1}: airflow {run.seconds:.1f} s (stage commands {sum(stage_seconds):.1f} s), "
                f"direct {direct.seconds:.1f} s")
        last_airflow_project = a
        if i < min(ctx.repeats, FULL_REPEATS) - 1:
            shutil.rmtree(b, ignore_errors=True)
    n_tasks = len(TASKS)
    overhead = [(a - d) / n_tasks for a, d in zip(airflow_s, direct_s)]
    figures = [
        Figure("orchestration.airflow_seconds", "whole retraining through Airflow (airflow dags test)", "s",
               airflow_s, higher_is_better=False),
        Figure("orchestration.direct_seconds", "the same stages run directly (python -m pipeline run)", "s",
               direct_s, higher_is_better=False),
        Figure("orchestration.airflow_over_direct", "Airflow / direct", "x", ratios(airflow_s, direct_s),
               higher_is_better=False, note="side-by-side pairs"),
        Figure("orchestration.overhead_per_task_seconds", f"Airflow overhead per task ((airflow - direct) / "
               f"{n_tasks} tasks)", "s", overhead, higher_is_better=False),
        Figure("orchestration.airflow_outside_stage_commands_seconds",
               "Airflow run time outside the 6 `dvc repro --single-item` commands", "s",
               [a - s for a, s in zip(airflow_s, inside_s)], higher_is_better=False,
               note="start-up, parse, DB, workspace, MLflow run, register, promote"),
    ]
    return figures, last_airflow_project


# The task process of a worker, reduced to what matters for imports: airflow.sdk and the DAG file
# are already loaded when the task starts (the marker on stderr separates that from the task).
TASK_PROBE = r"""
import importlib.util, json, sys, time, traceback
from collections import defaultdict
from types import SimpleNamespace
project, run_id, task_id, out = sys.argv[1:5]
import airflow.sdk
spec = importlib.util.spec_from_file_location("retrain_dag", project + "/dags/retrain_anomaly_detector.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
dag = module.retrain_anomaly_detector()
task = dag.get_task(task_id)
context = {"params": dag.params.validate(), "run_id": run_id, "outlet_events": defaultdict(SimpleNamespace),
           "dag_run": SimpleNamespace(conf={}, run_type="manual")}
before = set(sys.modules)
heavy_before = sorted(m for m in HEAVY if m in sys.modules)
sys.stderr.write("@@TASK-STARTS@@\n"); sys.stderr.flush()
started = time.perf_counter()
outcome = "success"
try:
    task.python_callable(*task.op_args, **context)
except BaseException as error:
    outcome = type(error).__name__ + ": " + str(error).strip().splitlines()[-1][:200] if str(error).strip() \
        else type(error).__name__
seconds = time.perf_counter() - started
sys.stderr.write("@@TASK-ENDS@@\n"); sys.stderr.flush()
json.dump({"outcome": outcome, "seconds": seconds, "heavy_before": heavy_before,
           "heavy": sorted(m for m in HEAVY if m in sys.modules and m not in before)}, open(out, "w"))
""".replace("HEAVY", repr(HEAVY))

# A stage process as DVC starts it (python -m pipeline <stage>), reporting what it had loaded at exit.
STAGE_PROBE = r"""
import atexit, json, runpy, sys
out, stage = sys.argv[1:3]
atexit.register(lambda: json.dump(sorted(m for m in HEAVY if m in sys.modules), open(out, "w")))
sys.argv = ["pipeline", stage]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
""".replace("HEAVY", repr(HEAVY))


def _import_seconds(stderr: str) -> float:
    """Seconds of top-level imports between the markers in ``-X importtime`` output."""
    inside, total_us = False, 0
    for line in stderr.splitlines():
        if line.startswith("@@TASK-STARTS@@"):
            inside = True
        elif line.startswith("@@TASK-ENDS@@"):
            break
        elif inside and line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and name.startswith(" ") and not name.startswith("  "):
                total_us += int(cumulative)  # depth 0: it includes everything it imported in turn
    return total_us / 1e6


def _probe_task(ctx: Context, project: Path, run_id: str, task_id: str, env: dict) -> dict:
    out = ctx.folder("probes") / f"task-{task_id}.json"
    done = subprocess.run([PYTHON, "-X", "importtime", "-c", TASK_PROBE, str(project), run_id, task_id, str(out)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if not out.is_file():
        raise RuntimeError(f"task probe {task_id} exited {done.returncode}:\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["import_seconds"] = _import_seconds(done.stderr)
    return result


def _task_imports(ctx: Context, project: Path | None) -> list[Figure]:
    if project is None:  # quick: the validate task only, in a small project with a run's workspace
        project = _project(ctx.folder("probe") / "project", QUICK_BATCH)
        run_id, tasks = "manual__bench-probe", ("validate",)
        # the workspace the first task would make, less its MLflow run (validate does not log to it)
        # and with ingest's output in it; cheap, and not part of what is measured
        run_child([PYTHON, "-c", "import sys; from pipeline import workspace; "
                   "ws = workspace.create(sys.argv[1], sys.argv[2]); "
                   "workspace.update(ws, mlflow_run_id='bench-probe-no-mlflow-run')", str(project), run_id],
                  cwd=project, env=_env())
        run_child([PYTHON, "-m", "pipeline", "ingest"], cwd=project / "runs" / "latest", env=_env())
    else:  # the last Airflow run's workspace: stage tasks find their stage up to date (DVC skips it)
        run_id = json.loads((project / "runs" / "latest" / ".workspace.json").read_text())["run_id"]
        tasks = TASKS
    env = _airflow_env(project, project / ".airflow")
    figures, heavy_note = [], {}
    validate_task = None
    for task_id in tasks:
        result = _probe_task(ctx, project, run_id, task_id, env)
        ctx.log(f"  task {task_id}: imports {result['import_seconds']:.2f} s of {result['seconds']:.1f} s; "
                f"heavy {result['heavy']}; {result['outcome']}")
        if result["outcome"] != "success" and task_id != "promote":
            raise RuntimeError(f"task {task_id} failed in the probe: {result['outcome']}")
        heavy_note[task_id] = result["heavy"]
        if task_id == "validate":
            validate_task = result
        figures.append(Figure(
            f"orchestration.task_import_seconds.{task_id}",
            f"task `{task_id}`: seconds importing in its process" + (" (the first task: also makes the run's "
                                                                   "workspace and MLflow run)" if task_id == "ingest" else ""),
            "s", [result["import_seconds"]], higher_is_better=False,
            note="heavy: " + (", ".join(result["heavy"]) or "none")))
    # the validate stage's own process, as DVC starts it, in the run's workspace (data/raw is there)
    workspace = project / "runs" / "latest"
    out = ctx.folder("probes") / "stage-validate.json"
    stage = run_child([PYTHON, "-c", STAGE_PROBE, str(out), "validate"], cwd=workspace, env=_env(), check_rc=False,
                      timeout=600)
    if not out.is_file() or stage.returncode != 0:
        raise RuntimeError(f"validate stage probe exited {stage.returncode}:\n{stage.output[-3000:]}")
    stage_heavy = json.loads(out.read_text())
    ctx.log(f"  validate stage process: {stage.seconds:.1f} s, heavy {stage_heavy}")
    in_task = "torch" in validate_task["heavy"] or "torch" in validate_task["heavy_before"]
    in_stage = "torch" in stage_heavy
    torch_figure = Figure(
        "orchestration.validate_imports_torch", "the validate task or its stage process imports torch",
        "1 = yes", [1.0 if (in_task or in_stage) else 0.0], target="not imported", met=not (in_task or in_stage),
        higher_is_better=False,
        note=f"task process: {'torch' if in_task else 'no torch'} (heavy: {', '.join(validate_task['heavy']) or 'none'}); "
             f"stage process: {'torch' if in_stage else 'no torch'} (heavy: {', '.join(stage_heavy) or 'none'})")
    return figures + [torch_figure]


PARSE_PROBE = r"""
import json, sys, time
import airflow, airflow.sdk
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
started = time.perf_counter()
bag = DagBag(sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "errors": {str(k): str(v)[-300:] for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dags), "new_modules": len(set(sys.modules) - before),
                  "heavy": sorted(m for m in HEAVY if m in sys.modules and m not in before)}))
""".replace("HEAVY", repr(HEAVY))


def _dag_parse(ctx: Context) -> list[Figure]:
    env = _airflow_env(ROOT, ctx.folder("parse-airflow-home"))
    samples, heavy = [], set()
    for _ in range(max(2, ctx.repeats) if not ctx.quick else 1):
        done = subprocess.run([PYTHON, "-c", PARSE_PROBE, str(ROOT / "dags")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"DAG parse probe exited {done.returncode}:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if result["errors"] or DAG_ID not in result["dags"]:
            raise RuntimeError(f"the DAG folder did not parse: {result}")
        samples.append(result["seconds"])
        heavy |= set(result["heavy"])
        ctx.log(f"  DAG folder parse: {result['seconds']:.3f} s, {result['new_modules']} modules imported, "
                f"heavy {result['heavy']}")
    return [check(Figure("orchestration.dag_parse_seconds",
                         "DAG folder parse (DagBag) after airflow is imported, fresh interpreter", "s", samples,
                         higher_is_better=False, note="heavy imports: " + (", ".join(sorted(heavy)) or "none")),
                  at_most=1.0)]


def run(ctx: Context) -> list[Figure]:
    figures: list[Figure] = []
    project = None
    if ctx.quick:
        ctx.log("  quick: Airflow vs direct skipped (one Airflow run takes minutes here)")
    else:
        compared, project = _airflow_vs_direct(ctx)
        figures += compared
    figures += _task_imports(ctx, project)
    figures += _dag_parse(ctx)
    return figures
