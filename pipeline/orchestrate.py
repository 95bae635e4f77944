"""What the Airflow tasks do, so that the DAG files hold only scheduling.

Every task names its run by the scheduler's run id and works in that run's own
workspace (pipeline.workspace): the first task makes it, with the trigger's
overrides, and starts the run's MLflow run; later tasks and retries find both again.
A stage task runs its stage through ``dvc repro --single-item`` so DVC skips it
when nothing it depends on changed. Nothing here imports Airflow: a scheduler maps
PermanentFailure to "fail without retrying" and ``promoted: False`` to "skip" (or, when
:func:`approval_question` has a question, to asking a person first).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline import run_record, steps, workspace
from pipeline.config import ConfigError, load
from pipeline.io import StageError, read_json
from pipeline.layout import Layout
from pipeline.workspace import Workspace

FAILURES = "failures.jsonl"


class PermanentFailure(StageError):
    """Running the task again would fail the same way (bad trigger input, refused data, a
    diverged model); a scheduler should fail the run at once instead of retrying."""


@contextmanager
def _scrubbed_errors() -> Iterator[None]:
    """An error that leaves a task with a secret in its text (MLflow names the tracking URL,
    password and all) leaves it scrubbed: the scheduler logs it and hands it to the failure
    callback. A StageError keeps its type (PermanentFailure still means "do not retry")."""
    from pipeline.secrets import scrubbed_error

    try:
        yield
    except Exception as error:
        clean = scrubbed_error(error)
        if clean is None or clean is error:
            raise
        raise clean from None


def project_layout(project: Path) -> Layout:
    return Layout(root=Path(project).resolve(), config=load(Path(project) / "params.yaml"))


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def store_env(project: Path) -> dict[str, str]:
    """Every run's workspace logs into the project's MLflow store, not one of its own."""
    from pipeline import tracking

    layout = project_layout(project)
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(layout)}
    env.update(tracking.client_env(env["MLFLOW_TRACKING_URI"]))
    root = tracking.artifact_root(layout)
    if root:
        env["MLFLOW_ARTIFACT_ROOT"] = root
    return env


def prepare(project: Path, run_id: str, overrides: dict[str, Any] | None = None, force: bool = False,
            reason: str = "", trigger: str = "airflow", triggered_by: str = "") -> Workspace:
    """The run's workspace and MLflow run, made by the first task that asks.

    Trigger input is checked here, before anything is made: a bad value, or a forced
    promotion without a reason, is a PermanentFailure that names the key. ``triggered_by``
    (the user who triggered the run, or ``scheduler``) is kept for the audit trail: the MLflow
    run's ``triggered_by`` tag, and the version's ``promoted_by`` if this run promotes.
    """
    if force and not str(reason or "").strip():
        raise PermanentFailure("force_promote is set but force_reason is empty: a forced promotion must say why")
    try:
        ws = workspace.create(project, run_id, overrides)
    except ConfigError as error:
        raise PermanentFailure(str(error)) from None
    if ws.mlflow_run_id:
        return ws
    with environ(store_env(ws.project)), _scrubbed_errors():
        mlflow_run_id = run_record.start(ws.layout, trigger, tags={
            "airflow_run_id": run_id, "workspace": str(ws.root),
            "trigger_overrides": json.dumps(ws.record.get("overrides", {}), sort_keys=True),
            "force_promote": str(bool(force)).lower(), "force_reason": reason or "",
            "triggered_by": triggered_by or ""})
    return workspace.update(ws, mlflow_run_id=mlflow_run_id, force=bool(force), reason=reason or "",
                            triggered_by=triggered_by or "", started=time.time())


def _existing(project: Path, run_id: str) -> Workspace:
    root = workspace.runs_dir(Path(project).resolve()) / workspace.key_of(run_id)
    if not (root / workspace.RECORD).is_file():
        raise StageError(f"no workspace for run {run_id} at {root}: the first task (ingest) makes it")
    return Workspace(root, Path(project).resolve(), read_json(root / workspace.RECORD))


def stage(project: Path, run_id: str, name: str) -> dict:
    """Run one dvc.yaml stage in the run's workspace (DVC skips it when nothing changed).

    Its output goes to this task's log line by line. A SIGTERM/SIGINT to the task (Airflow's
    execution_timeout, a run marked failed) or an exception raised into it stops the whole
    process tree (dvc and the stage under it) before the task fails (pipeline.process.stream):
    no stage keeps running without its task.
    """
    ws = _existing(project, run_id)
    layout = ws.layout
    with environ(store_env(ws.project)):
        env = run_record.stage_env(layout, ws.mlflow_run_id)
    started = time.time()
    try:
        steps.repro(ws.root, env, "--single-item", name)
    except steps.ReproFailed as failed:
        if failed.refused_data:
            report = f"; report: {layout.validation_html}" if name == "validate" else ""
            raise PermanentFailure(f"{name} refused the data (a retry would fail the same way){report}") from None
        raise StageError(f"stage {name} failed (dvc repro exit {failed.code}) in {ws.root}; its output is in the "
                         "log above") from None
    print(f"{name}: done in {time.time() - started:.1f} s in {ws.root}")
    return {"stage": name, "workspace": str(ws.root), "seconds": round(time.time() - started, 1)}


def register(project: Path, run_id: str) -> dict:
    """Push the run's data to the DVC remote, then register and gate the model."""
    from pipeline.stages import register as register_stage

    ws = _existing(project, run_id)
    layout = ws.layout
    with environ(store_env(ws.project)), _scrubbed_errors():
        steps.push_data(ws.root, run_record.stage_env(layout, ws.mlflow_run_id), "register")
        report = register_stage.run(layout, run_id=ws.mlflow_run_id)
    return {key: report.get(key) for key in ("version", "passed", "failed", "reasons", "model_name", "run_id",
                                             "unchanged_of")}


# The two answers to the question failed gates open (the retraining DAG's promote task);
# KEEP is also what a timeout answers.
KEEP, PROMOTE_ANYWAY = "keep the champion", "promote anyway"


def promote(project: Path, run_id: str, approval: dict[str, str] | None = None) -> dict:
    """Move the champion if the gates passed (or the trigger forced it); write the summary.

    Returns ``promoted: False`` with the failed gates when the champion stays. ``approval`` is a
    person's answer to :func:`approval_question` (``decision``, ``by``, ``reason``): promote anyway
    is a forced promotion through this same path, by that person and for that reason (without a
    reason it is refused, and nothing moves); keep leaves the champion. Either is recorded on the
    version (``approval_decision``, ``approved_by``, ``approval_reason``).
    """
    from pipeline.stages import promote as promote_stage

    ws = _existing(project, run_id)
    layout = ws.layout
    force, reason = bool(ws.record.get("force")), str(ws.record.get("reason", ""))
    actor = ws.record.get("triggered_by") or None
    if approval is not None:
        decision, by, why = approval["decision"], approval["by"], str(approval.get("reason") or "").strip()
        if decision not in (KEEP, PROMOTE_ANYWAY):
            raise PermanentFailure(f"unknown decision {decision!r}: the answers are {KEEP!r} and {PROMOTE_ANYWAY!r}")
        if decision == PROMOTE_ANYWAY and not why:
            raise PermanentFailure(f"{by} chose {PROMOTE_ANYWAY!r} without a reason: refused, nothing was promoted "
                                   "and the champion stays. A promotion past failed gates must say why; clear this "
                                   "task to be asked again")
        if decision == PROMOTE_ANYWAY:
            force, reason, actor = True, why, by
    with environ(store_env(ws.project)), _scrubbed_errors():
        report = read_json(layout.gates)
        outcome = promote_stage.run(layout, version=str(report["version"]), force=force, reason=reason, actor=actor)
        if not outcome.get("promoted") and not report.get("unchanged_of") and \
                str(outcome.get("champion")) == str(report["version"]):
            outcome["promoted"] = True  # a retry after the alias moved: the move is this run's
        if approval is not None:
            promote_stage.record_approval(layout, str(report["version"]), decision, by, why)
            outcome["approval"] = {"decision": decision, "by": by, "reason": why}
        started = ws.record.get("started")
        run_record.finish(layout, ws.mlflow_run_id, report, outcome,
                          round(time.time() - started, 1) if started else None)
    return outcome


def approval_question(project: Path, run_id: str, outcome: dict) -> dict | None:
    """What to ask a person when :func:`promote` left the champion because gates failed: the
    subject, a Markdown body with the evidence (the failed gates, candidate against champion,
    where gates.json and the plots are) and the timeout in hours. None when there is nothing to
    ask: promoted, the same model as a version already judged (``unchanged_of``), or
    ``gates.approval_timeout_hours`` is 0. ``{"answered": <approval>}`` when the version records
    an answer already: the task was tried again or cleared after it, and applies it again rather
    than ask twice."""
    from pipeline.stages import promote as promote_stage

    ws = _existing(project, run_id)
    layout = ws.layout
    hours = layout.config.gates.approval_timeout_hours
    if outcome.get("promoted") or outcome.get("unchanged_of") or not outcome.get("reasons") or not hours:
        return None
    report = read_json(layout.gates)
    name, version = layout.config.registry.model_name, str(report["version"])
    with environ(store_env(ws.project)), _scrubbed_errors():
        answered = promote_stage.recorded_approval(layout, version)
    if answered:
        return {"answered": answered}
    champion = report.get("champion_version") or report.get("gated_against")
    lines = [f"**{name} v{version}** failed its gates"
             + (f" against the champion **v{champion}**" if champion else "") + ".", "", "Failed gates:", ""]
    lines += [f"- {reason}" for reason in outcome["reasons"]]
    candidate, incumbent = report.get("candidate_metrics") or {}, report.get("champion_metrics") or {}
    if candidate:
        lines += ["", f"| metric (test split) | v{version} |" + (f" champion v{champion} |" if incumbent else ""),
                  "|---|---|" + ("---|" if incumbent else "")]
        for metric in ("auroc", "average_precision", "fpr", "precision", "recall", "f1"):
            value, other = candidate.get(metric), incumbent.get(metric)
            if isinstance(value, (int, float)):
                lines.append(f"| {metric} | {value:.4f} |" + (f" {other:.4f} |" if isinstance(other, (int, float))
                                                               else " |" if incumbent else ""))
    plots = sorted(path.name for path in layout.plots.glob("*.png")) if layout.plots.is_dir() else []
    lines += ["", "Evidence:", "", f"- gate report: `{layout.gates}` (and `gates/gates.json` in MLflow run "
              f"`{report.get('run_id')}`, tracking `{report.get('tracking_uri')}`)"]
    if plots:
        lines.append(f"- plots in `{layout.plots}`: " + ", ".join(f"`{plot}`" for plot in plots))
    lines += ["", f"**{KEEP}** leaves " + (f"v{champion}" if champion else "no champion") + " serving; it is "
              f"what happens if nobody answers within {hours:g} h. **{PROMOTE_ANYWAY}** makes v{version} the "
              "champion now: a reason is required, and it is recorded on the version with your name."]
    return {"subject": f"{name} v{version} failed its gates: keep the champion or promote anyway?",
            "body": "\n".join(lines), "timeout_hours": hours}


def record_failure(project: Path, run_id: str, task: str, error: str, details: dict[str, Any]) -> Path:
    """One place a person looks after a failed night: ``runs/failures.jsonl`` (one line per
    failed task), the run's MLflow run (FAILED, with ``failed_stage`` and ``error`` tags)
    and the run's summary. Never raises: it runs while something else already went wrong.
    Every text is scrubbed (pipeline.secrets): an exception from MLflow names the tracking
    URL, password and all."""
    from pipeline.secrets import scrub, scrub_data

    project = Path(project).resolve()
    path = workspace.runs_dir(project) / FAILURES
    error = scrub(error)
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": run_id, "task": task, "error": error, **details}
    has_workspace = (workspace.runs_dir(project) / workspace.key_of(run_id) / workspace.RECORD).is_file()
    try:  # a retraining run has a workspace and an MLflow run; a scoring run has neither
        ws = _existing(project, run_id) if has_workspace else None
        if ws is not None:
            line["workspace"] = str(ws.root)
        if ws is not None and ws.mlflow_run_id:
            line["mlflow_run_id"] = ws.mlflow_run_id
            with environ(store_env(project)):
                run_record.fail(ws.layout, ws.mlflow_run_id, task, error)
    except Exception as problem:  # the record below still gets written
        line["note"] = f"MLflow run not updated: {problem}"
    line = scrub_data(json.loads(json.dumps(line, default=str)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(f"failure recorded in {path}: {task}: {error}")
    return path


def summary(project: Path, run: Path | None = None) -> tuple[Layout, dict] | None:
    """The last run's workspace layout and summary (or a given workspace's), as the tasks wrote them."""
    root = run or workspace.latest(project)
    if root is None:
        return None
    layout = Layout(root=Path(root).resolve(), config=load(Path(root) / "params.yaml"))
    return (layout, read_json(layout.run_summary)) if layout.run_summary.is_file() else None
