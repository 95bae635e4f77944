"""A password in MLFLOW_TRACKING_URI (the supported way to give the client credentials)
never reaches anything the pipeline writes: not its files, not the MLflow runs, tags,
params and artifacts, not what it prints (a task's log).

A real `mlflow server` on loopback (it ignores basic auth, so every call goes through) and
the password in the URI the pipeline is given. A whole retraining runs and succeeds; then
the server is killed and the calls that fail on it fail as they would in production, with
MLflow's own exception texts (which name the URL, password and all): the Airflow failure
callback of a retraining task (``dags/common.py``) and of a scoring run, ``score`` and
``register`` from the CLI. The server comes back and the callback runs once more, so the
MLflow ``error`` tag and the run's summary get the text too.

Then every file under the project (its run workspaces, reports, ``runs/failures.jsonl``,
summaries, DVC and git folders) and under the server (its database: every tag and param;
its artifact store: every artifact), every tag and param read back through the API and
everything printed is searched for the password, plain, percent-encoded and in base64 as
basic auth sends it. Each sink is also checked to hold the masked URI, so the test knows it
exercised them rather than missing them.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from conftest import clean_env, make_workspace, run_cli
from servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NAME = "anomaly-detector"
USER, PASSWORD = "someuser", "S3cretPassw0rd"
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
RUN_ID = "manual__2025-01-01T00:00:00+00:00"

# what Airflow does around a task: the task, then on failure its on_failure_callback
# (dags/common.py: runs/failures.jsonl, and the run's MLflow run FAILED with the error)
CALLBACK = """
import json, sys
from pathlib import Path
from types import SimpleNamespace

from dags.common import record_failure
from pipeline import orchestrate, score

project, run_id, phase, raw_file = sys.argv[1:]

def callback(task, dag, run, error):
    record_failure({"task_instance": SimpleNamespace(task_id=task, dag_id=dag, try_number=1, log_url=None),
                    "exception": error, "run_id": run})

if phase == "prepare":
    orchestrate.prepare(project, run_id)
elif phase == "down":
    from pipeline.registry import connect
    from pipeline import tracking
    layout = orchestrate.project_layout(project)
    try:  # what MLflow itself says when the server is gone
        connect(tracking.store(layout)).get_experiment_by_name(layout.config.registry.experiment)
    except Exception as error:
        Path(raw_file).write_text(json.dumps(f"{type(error).__name__}: {error}"))
    try:
        orchestrate.register(project, run_id)
    except Exception as error:
        callback("register", "retrain_anomaly_detector", run_id, error)
    try:  # the scoring DAG's task: files wait, the champion cannot be loaded
        score.incoming(layout, "claim-1")
    except Exception as error:
        callback("score", "score_with_champion", "scheduled__2025-01-01T01:00:00+00:00", error)
elif phase == "back":  # the callback of a later failure, the server up again
    callback("promote", "retrain_anomaly_detector", run_id, RuntimeError(json.loads(Path(raw_file).read_text())))
"""


def _leaks(data: bytes) -> list[str]:
    forms = {"plain": PASSWORD, "percent-encoded": quote(PASSWORD, safe=""),
             "basic auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    return [name for name, form in forms.items() if form.encode() in data]


def _files_with_the_password(*folders: Path) -> dict[str, list[str]]:
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                leaks = _leaks(path.read_bytes())
                if leaks:
                    found[str(path)] = leaks
    return found


def _callback(project: Path, phase: str, raw_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", CALLBACK, str(project), RUN_ID, phase, str(raw_file)],
                            cwd=project, env=clean_env(env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{phase}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def test_a_password_in_the_tracking_uri_is_written_and_printed_nowhere(server, tmp_path):
    from mlflow import MlflowClient

    project = make_workspace(tmp_path / "project", {"gates": LOW_GATES, "train": {"epochs": 2}})
    secret_uri = f"http://{USER}:{PASSWORD}@127.0.0.1:{server.port}"
    masked = f"http://***@127.0.0.1:{server.port}"
    env = {"MLFLOW_TRACKING_URI": secret_uri, "ANOMALY_PIPELINE_PROJECT": str(project), **FAIL_FAST}
    raw_file = tmp_path / "raw-mlflow-error.json"  # outside the project: the one place the raw text may go
    printed: list[str] = []  # everything the pipeline printed: a task's log

    # a whole retraining, through the server, with the password in the URI
    run = run_cli(project, "run", env=env)
    printed += [run.stdout, run.stderr]
    assert "retraining summary" in run.stdout
    gates = json.loads((project / "reports" / "gates.json").read_text())
    assert gates["tracking_uri"] == masked, gates["tracking_uri"]

    # an Airflow run's first task (workspace and MLflow run), then the server dies
    printed += [_callback(project, "prepare", raw_file, env).stdout]
    inbox = project / "data" / "incoming"
    inbox.mkdir(parents=True, exist_ok=True)
    image = next((project / "data" / "raw").rglob("*.png"))
    (inbox / "waiting.png").write_bytes(image.read_bytes())
    server.crash()

    down = _callback(project, "down", raw_file, env)
    printed += [down.stdout, down.stderr]
    raw = json.loads(raw_file.read_text())
    assert PASSWORD in raw, raw  # MLflow's exception text does hold the password: the sinks get it

    out = tmp_path / "scores.csv"
    for args in (("score", str(inbox), "--out", str(out)), ("register",)):
        failed = run_cli(project, *args, check=False, env=env)
        assert failed.returncode != 0, failed.stdout[-3000:]
        assert masked in failed.stderr, failed.stderr[-3000:]  # it names the server, without the password
        printed += [failed.stdout, failed.stderr]

    server.start()  # the same database: everything logged before is there
    back = _callback(project, "back", raw_file, env)
    printed += [back.stdout, back.stderr]

    # the sinks were reached, and hold the masked URI
    failures = [json.loads(line) for line in (project / "runs" / "failures.jsonl").read_text().splitlines()]
    by_task = {line["task"]: line for line in failures}
    assert set(by_task) == {"register", "score", "promote"}, failures
    assert masked in by_task["register"]["error"] and masked in by_task["register"]["note"], by_task["register"]
    assert masked in by_task["score"]["error"], by_task["score"]
    assert masked in by_task["promote"]["error"] and "note" not in by_task["promote"], by_task["promote"]
    workspace = Path(by_task["promote"]["workspace"])
    summary = json.loads((workspace / "reports" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and masked in summary["error"], summary
    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    failed_run = client.get_run(by_task["promote"]["mlflow_run_id"])
    assert failed_run.info.status == "FAILED" and masked in failed_run.data.tags["error"], failed_run.data.tags

    # nothing anywhere holds the password
    assert _files_with_the_password(project, Path(server.folder)) == {}
    records = []
    for experiment in client.search_experiments():
        for ml_run in client.search_runs([experiment.experiment_id]):
            records.append((ml_run.info.run_id, ml_run.data.tags, ml_run.data.params))
            download = Path(client.download_artifacts(ml_run.info.run_id, "", str(tmp_path / ml_run.info.run_id)))
            assert _files_with_the_password(download) == {}, ml_run.info.run_id
    for version in client.search_model_versions(f"name='{NAME}'"):
        records.append((f"v{version.version}", version.tags, {}))
    assert len(records) >= 3, records  # the finished run, its version, the failed run
    leaking = [(name, key) for name, tags, params in records for key, value in {**tags, **params}.items()
               if _leaks(str(value).encode())]
    assert leaking == []
    assert [line for text in printed for line in text.splitlines() if _leaks(line.encode())] == []
