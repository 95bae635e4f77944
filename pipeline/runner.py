"""One whole retraining: dvc repro (ingest .. evaluate), then register and promote.

One MLflow run covers it all: it is created first, so the train stage can log its
per-epoch loss into it live, and it ends FAILED with the validation report attached
when the data is refused.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from pipeline import dvc_cli
from pipeline.io import EXIT_DATA_ERROR, StageError, read_json, write_json
from pipeline.layout import Layout

# SIGINT, then SIGTERM, then SIGKILL to the child tree: DVC ignores SIGINT while its stage
# runs and reports the stage's exit, so the first is the clean one. Together they stay
# under the 5 s Airflow's supervisor waits before it SIGKILLs the task's process group.
STOP_STEPS = ((signal.SIGINT, 2.0), (signal.SIGTERM, 1.5), (signal.SIGKILL, 5.0))


class Interrupted(StageError):
    """This process got SIGTERM or SIGINT (Airflow's execution_timeout or a task marked
    failed, a node draining, Ctrl-C) while a child ran; the child's whole tree was stopped."""


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGINT raise Interrupted here, so the caller can stop its children first.

    Without this a SIGTERM kills only this process and ``dvc repro`` and the stage it runs
    go on as orphans (training for hours, holding DVC's lock). A previous Python SIGTERM
    handler (Airflow's task runner calls the operator's on_kill) still runs first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        before = previous[signum]
        if signum == signal.SIGTERM and callable(before):
            before(signum, frame)
        raise Interrupted(f"got {signal.Signals(signum).name}")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_tree(process: subprocess.Popen) -> None:
    """Stop a child and every process under it (dvc -> the stage -> its workers), escalating.

    The tree is read before the first signal: once dvc exits, its stage is re-parented and
    could no longer be found under it.
    """
    import psutil

    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig, grace in STOP_STEPS:
        with suppress(psutil.NoSuchProcess):
            tree += [p for p in psutil.Process(process.pid).children(recursive=True) if p not in tree]
        alive = [p for p in tree if _alive(p)]
        if not alive:
            break
        for p in alive:
            with suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            if process.poll() is None:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=0.05)  # reaps the direct child; the others are polled
            else:
                time.sleep(0.05)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)


def stream(command: list[str], cwd: Path, env: dict[str, str], merge: bool = True) -> tuple[int, str]:
    """Run a command, echoing its output line by line (stdout and stderr together when
    ``merge``, else only stderr is piped and echoed to ours), and return (exit code, tail).

    If this process is signalled or interrupted (SIGTERM, SIGINT, Airflow's timeout
    exception) while the command runs, the command's whole process tree is stopped
    before the exception goes on, so no stage outlives the task that started it.

    Each line is scrubbed (pipeline.secrets) before it is echoed or kept: a stage's
    MLflow error names the tracking URL, and a password in it would reach the task's log.
    """
    from pipeline.secrets import literals, scrub

    tail: deque[str] = deque(maxlen=80)
    out = sys.stdout if merge else sys.stderr
    known = literals({**os.environ, **(env or {})})
    with _signals_raise():
        process = None
        try:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE if merge else None,
                                       stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                                       bufsize=1, errors="replace")
            pipe = process.stdout if merge else process.stderr
            for line in pipe:
                line = scrub(line, known)
                print(line, end="", file=out, flush=True)
                tail.append(line)
            process.wait()
        except BaseException as error:
            if process is not None:
                with _signals_ignored():  # a second Ctrl-C or SIGTERM must not cut the clean-up short
                    stop_tree(process)
            if isinstance(error, Interrupted):
                shown = _shown(command)
                raise Interrupted(f"{error} while running '{shown}'; it and its child processes were stopped") \
                    from None
            raise
        finally:
            if process is not None:
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
    return process.returncode, "".join(tail)


def _shown(command: list[str]) -> str:
    """A command as a person would type it: ``dvc repro …``, not the interpreter and its -c script."""
    if command[:len(dvc_cli.COMMAND)] == dvc_cli.COMMAND:
        return " ".join(["dvc", *command[len(dvc_cli.COMMAND):]])
    return " ".join(command[2:] if command[1:2] == ["-m"] else command)


def failed_stage(tail: str) -> tuple[str | None, int | None, str]:
    """From ``dvc repro``'s output: the stage that failed, its exit code, and its own error line."""
    stages = re.findall(r"failed to reproduce '([^']+)'", tail)
    codes = re.findall(r"exited with (-?\d+)", tail)
    errors = [line[len("error: "):].strip() for line in tail.splitlines() if line.startswith("error: ")]
    return (stages[-1] if stages else None, int(codes[-1]) if codes else None,
            errors[-1] if errors else (tail.strip().splitlines() or [""])[-1])


def _dvc(args: list[str], root: Path, env: dict[str, str]) -> tuple[int, str]:
    return stream([*dvc_cli.COMMAND, *args], root, env, merge=False)


def start(layout: Layout, trigger: str, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run that the whole retraining logs into; returns its id."""
    from pipeline.registry import connect, ensure_experiment, promotion_lock
    from pipeline import tracking

    store = tracking.store(layout)
    # Two runs starting at once on a new SQLite store both ran MLflow's schema migrations
    # and one failed ("Online migration expected to match one row"); the registry's lock
    # file (one writer at a time on this store) makes the second wait for the first.
    with promotion_lock(tracking.promotion_lock(layout) if tracking.local_store(layout) else None):
        client = connect(store)
        experiment_id = ensure_experiment(client, layout.config.registry.experiment, store.artifact_root)
    ml_run = client.create_run(experiment_id, run_name=time.strftime("retrain-%Y%m%d-%H%M%S"),
                               tags={"pipeline": "retrain", "trigger": trigger, **(tags or {})})
    print(f"run: MLflow run {ml_run.info.run_id} in experiment '{layout.config.registry.experiment}' "
          f"at {tracking.shown(store.tracking_uri)}")
    return ml_run.info.run_id


def stage_env(layout: Layout, run_id: str) -> dict[str, str]:
    """What a stage subprocess needs: the run to log into, the store, this venv's tools.

    Light on purpose: every Airflow stage task calls it in its own process, and going
    through tracking.store (pipeline.registry) imported mlflow and pandas there, 7-10 s
    per task (benchmarks/orchestration.py)."""
    from pipeline import tracking

    uri, artifacts = tracking.tracking_uri(layout), tracking.artifact_root(layout)
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if artifacts:
        env["MLFLOW_ARTIFACT_ROOT"] = artifacts
    env.update(tracking.client_env(uri))
    return env


def fail(layout: Layout, run_id: str, stage: str, error: str = "") -> dict:
    """End the MLflow run FAILED with the validation report attached; write and print the summary.

    The error is scrubbed first (pipeline.secrets): MLflow's exception texts hold the tracking
    URL, with any password in it, and it goes to a tag, the summary and the log."""
    from pipeline.registry import connect
    from pipeline import tracking
    from pipeline.secrets import scrub, scrub_data

    error = scrub(error)
    client = connect(tracking.store(layout))
    if layout.validation_dir.is_dir():
        client.log_artifacts(run_id, str(layout.validation_dir), "validation")
    client.set_tag(run_id, "failed_stage", stage)
    if error:
        client.set_tag(run_id, "error", error[:4900])
    client.set_terminated(run_id, "FAILED")
    summary = {"status": "failed", "run_id": run_id, "failed_stage": stage, "error": error,
               "validation": _validation(layout),
               "message": f"the pipeline stopped at {stage}; nothing was registered or promoted"
               if stage not in ("register", "promote") else f"the pipeline stopped at {stage}; the champion "
               "was not moved"}
    summary = scrub_data(summary)
    write_json(layout.run_summary, summary)
    _print_summary(layout, summary, tracking.store(layout).tracking_uri)
    return summary


def finish(layout: Layout, run_id: str, report: dict, promotion: dict, seconds: float | None = None) -> dict:
    """Write and print the summary of a retraining that got through register and promote."""
    from pipeline import tracking
    from pipeline.secrets import scrub_data

    summary = {"status": "finished", "run_id": run_id, "seconds": seconds,
               "validation": _validation(layout), "train": read_json(layout.train_metrics),
               "calibration": read_json(layout.threshold), "metrics": read_json(layout.metrics),
               "gates": {k: report[k] for k in ("passed", "failed", "reasons")},
               "version": report["version"], "unchanged_of": report.get("unchanged_of"), "promotion": promotion}
    summary = scrub_data(summary)  # the gate report's champion note, a promotion's reasons: error texts
    write_json(layout.run_summary, summary)
    _print_summary(layout, summary, tracking.store(layout).tracking_uri)
    return summary


def run(layout: Layout, force: bool = False, reason: str = "") -> int:
    """The whole retraining in this process (the CLI's ``run``; Airflow runs it task by task)."""
    from pipeline.stages import promote, register

    started = time.time()
    run_id = start(layout, os.environ.get("PIPELINE_TRIGGER", "cli"))
    env = stage_env(layout, run_id)
    try:
        code, tail = _dvc(["repro"], layout.root, env)
    except BaseException as error:  # SIGTERM or Ctrl-C: the stages were stopped; the run did not finish
        fail(layout, run_id, "dvc repro", str(error) or type(error).__name__)
        raise
    if code != 0:
        stage, stage_code, message = failed_stage(tail)
        fail(layout, run_id, stage or "dvc repro", message)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_DATA_ERROR if stage_code == EXIT_DATA_ERROR else 1
    if has_remote(layout.root) and _dvc(["push", "--quiet"], layout.root, env)[0] != 0:
        print("run: WARNING dvc push to the remote failed; the data is still in the local DVC cache")
    try:
        report = register.run(layout, run_id=run_id)
        promotion = promote.run(layout, version=report["version"], force=force, reason=reason)
    except BaseException:
        from pipeline.registry import connect
        from pipeline import tracking

        connect(tracking.store(layout)).set_terminated(run_id, "FAILED")  # champion untouched unless promote finished
        raise
    finish(layout, run_id, report, promotion, round(time.time() - started, 1))
    return 0


def has_remote(root: Path) -> bool:
    """A remote is set in the committed config or in the git-ignored local one."""
    return any(config.is_file() and "remote" in config.read_text()
               for config in (root / ".dvc" / "config", root / ".dvc" / "config.local"))


def _validation(layout: Layout) -> dict:
    return read_json(layout.validation_summary) if layout.validation_summary.is_file() else {}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_summary(layout: Layout, summary: dict) -> None:
    from pipeline import tracking

    _print_summary(layout, summary, tracking.tracking_uri(layout))


def _print_summary(layout: Layout, summary: dict, tracking_uri: str) -> None:
    from pipeline import tracking

    name = layout.config.registry.model_name
    validation = summary.get("validation") or {}
    lines = ["", "=" * 27 + " retraining summary " + "=" * 27]
    if validation:
        counts = ", ".join(f"{k} {v}" for k, v in validation.get("label_counts", {}).items())
        verdict = "passed" if validation.get("success") else "FAILED"
        unit = "rows" if layout.config.data.kind == "table" else "files"
        lines.append(f"validation   {verdict}: {validation.get('n_files', 0)} {unit} ({counts})")
        for failure in validation.get("failures", []):
            lines.append(f"               - {failure['description']}")
        if not validation.get("success"):
            lines.append(f"             report: {layout.validation_html}")
    if summary["status"] != "finished":
        lines += [f"result       {summary['message']}", f"MLflow run   {summary['run_id']} (FAILED)"]
        if summary.get("error"):
            lines.append(f"error        {summary['error'].strip().splitlines()[-1][:300]}")
    else:
        train, calibration, metrics = summary["train"], summary["calibration"], summary["metrics"]
        bound = calibration.get("fpr_bound")
        if "bank_size" in train:  # a feature family: fitted in one pass on a pretrained backbone
            training = (f"training     {train['family']} on {train['device']} ({train['backbone']}, pretrained "
                        f"{train['weights_source']}), fitted on {train['fit_images']} normal {layout.unit}, "
                        f"bank {train['bank_size']}, {train['seconds']:.1f} s")
        else:
            training = (f"training     {train['family']} on {train['device']}, {train['epochs']} epochs, "
                        f"{train['train_items']} {layout.unit}, {train['seconds']:.1f} s")
        lines += [
            training,
            f"threshold    {calibration['threshold']:.6g} (method {calibration['method']}"
            + (f", FPR guarantee <= {bound:.4f}" if bound is not None else "") + ")"
            + (f"  NOTE: {calibration['note']}" if calibration.get("note") else ""),
            f"test         AUROC {_fmt(metrics['auroc'])}  AP {_fmt(metrics['average_precision'])}  "
            f"precision {_fmt(metrics['precision'])}  recall {_fmt(metrics['recall'])}  F1 {_fmt(metrics['f1'])}  "
            f"FPR {_fmt(metrics['fpr'])}  ({metrics['n']} {layout.unit}, {metrics['n_anomalous']} anomalous)",
            f"registered   {name} v{summary['version']} (MLflow run {summary['run_id']})" if not
            summary.get("unchanged_of") else f"registered   nothing: data, params, code and weights are those of "
            f"{name} v{summary['version']} (this run: MLflow run {summary['run_id']})",
        ]
        promotion = summary["promotion"]
        if promotion.get("promoted"):
            lines.append(f"champion     v{promotion['champion']} is now the champion"
                         + (f" (previous: v{promotion['previous']})" if promotion.get("previous") else "")
                         + (" [FORCED]" if promotion.get("forced") else ""))
        else:
            lines.append(f"champion     unchanged; v{summary['version']} not promoted:")
            lines += [f"               - {r}" for r in promotion.get("reasons", [])] or \
                     [f"               - {promotion.get('note', '')}"]
        if summary.get("seconds") is not None:
            lines.append(f"took         {summary['seconds']:.0f} s")
    inputs = "CSV/Parquet files" if layout.config.data.kind == "table" else "images"
    lines += [
        "next         MLflow UI:  make mlflow   (MLFLOW_TRACKING_URI=" + tracking.shown(tracking_uri) + ")",
        f"             score:      .venv/bin/python -m pipeline score <folder of {inputs}> --out scores.csv",
        f"             in Python:  mlflow.pyfunc.load_model('models:/{name}@champion')",
        "=" * 74,
    ]
    print("\n".join(lines))
