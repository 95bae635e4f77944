"""The retraining DAG run by Airflow itself (``airflow dags test``, which runs
``dag.test()`` on a throw-away SQLite metadata database) in a scratch project.

A first run makes a champion that loads and scores; a worse model is registered but
``promote`` is skipped and the run still succeeds; a forced promotion without a reason and
refused data both fail the run early, write the failure record, and register nothing.

The runs share one workspace (each DAG run takes a while), but no test relies on another
having run before it: what a test needs is a module fixture (the first run, the worse
run), made on first use, and a test that changes what others read (the champion alias, the
scoring folders, the landing data) sets it itself or puts it back.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_workspace, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DAG_ID = "retrain_anomaly_detector"
LOW_GATES = {"gates": {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}}
# every run's workspace is kept (the default keeps 5): the first run's is read whichever test runs last
KEEP_ALL_RUNS = {"ANOMALY_PIPELINE_KEEP_RUNS": "100"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("dag") / "project", LOW_GATES)


def dags_test(ws: Path, conf: dict | None = None) -> subprocess.CompletedProcess:
    args = ["airflow", "dags", "test", DAG_ID] + (["-c", json.dumps(conf)] if conf else [])
    return run_cli(ws, *args, check=False, timeout=900, env=KEEP_ALL_RUNS)


def airflow_json(ws: Path, *args: str):
    """An airflow CLI listing as JSON (Airflow's own log lines come before it on stdout)."""
    return json.loads(run_cli(ws, "airflow", *args, "-o", "json").stdout.strip().splitlines()[-1])


def task_states(ws: Path) -> dict[str, str]:
    """Task states of the newest run, from Airflow's own metadata database."""
    newest = max(airflow_json(ws, "dags", "list-runs", DAG_ID), key=lambda r: r["start_date"] or "")
    rows = airflow_json(ws, "tasks", "states-for-dag-run", DAG_ID, newest["run_id"])
    return {row["task_id"]: row["state"] for row in rows} | {"__run__": newest["state"]}


def client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(ws: Path) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client(ws).get_model_version_by_alias("anomaly-detector", "champion").version)
    except MlflowException:
        return None


def versions(ws: Path) -> int:
    return len(client(ws).search_model_versions("name='anomaly-detector'"))


def failures(ws: Path) -> list[dict]:
    path = ws / "runs" / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class DagRun:
    """A run and what it left, read as soon as it ended (later runs move the champion and runs/latest)."""

    result: subprocess.CompletedProcess
    states: dict[str, str]
    champion: str | None
    workspace: Path | None     # runs/latest right after the run
    registered: str            # the version this run would register: one past those before it


def dag_run(ws: Path, conf: dict) -> DagRun:
    registered = str(versions(ws) + 1 if (ws / "mlflow.db").is_file() else 1)  # no store made before the run's
    result = dags_test(ws, conf)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    latest = ws / "runs" / "latest"
    return DagRun(result, task_states(ws), champion(ws), latest.resolve() if latest.exists() else None, registered)


@pytest.fixture(scope="module")
def first_run(ws) -> DagRun:
    """The first run of the project: trains, registers v1 and promotes it."""
    return dag_run(ws, {"epochs": 6})


@pytest.fixture(scope="module")
def worse_run(ws, first_run) -> DagRun:
    """A run that registers a model worse than the first run's champion (one epoch, a tiny step)."""
    return dag_run(ws, {"epochs": 1, "learning_rate": 0.00001})


@pytest.fixture
def first_champion(ws, first_run) -> str:
    """The first run's model as the champion (a forced promotion may have moved the alias)."""
    client(ws).set_registered_model_alias("anomaly-detector", "champion", first_run.registered)
    return first_run.registered


@pytest.fixture
def scoring_ws(ws, first_champion) -> Path:
    """The workspace with the first champion and nothing incoming, scored or archived yet."""
    for folder in ("scores", "data/incoming", "data/scored"):
        shutil.rmtree(ws / folder, ignore_errors=True)
    (ws / "scores").mkdir()
    (ws / "data" / "incoming").mkdir()
    return ws


def test_a_dag_run_trains_registers_and_promotes_a_champion_that_scores(ws, first_run, first_champion, tmp_path):
    states = first_run.states
    assert states == {**{t: "success" for t in ("ingest", "validate", "preprocess", "train", "calibrate",
                                                 "evaluate", "register", "promote")}, "__run__": "success"}
    assert first_run.champion == "1"
    version = client(ws).get_model_version("anomaly-detector", "1")
    run = client(ws).get_run(version.tags["run_id"])
    assert run.data.params["train.epochs"] == "6"  # the trigger's value, for this run only
    assert json.loads(run.data.tags["trigger_overrides"])["train.epochs"] == 6
    assert version.tags["airflow_run_id"].startswith("manual__")
    assert "epochs: 8" in (ws / "params.yaml").read_text()  # the project's params.yaml is untouched
    # the run worked in its own workspace, a git worktree of the project
    workspace = first_run.workspace
    assert (workspace / "dvc.lock").is_file() and (workspace / "models" / "model.pt").is_file()
    assert not (ws / "models").exists()

    # the champion scores, through the same command other jobs use
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((ws / "data" / "landing" / "batch-0001" / "scratch").glob("*.png"))[:3]:
        (images / path.name).write_bytes(path.read_bytes())
    scored = run_cli(ws, "score", str(images), "--out", str(tmp_path / "s.csv"))
    assert "3 images" in scored.stdout and "(v1)" in scored.stdout


def test_the_scoring_dag_scores_incoming_images_once_and_archives_them(scoring_ws):
    ws = scoring_ws
    landing = ws / "data" / "landing" / "batch-0001"
    incoming = ws / "data" / "incoming"
    (incoming / "line-3").mkdir(parents=True)
    for path in sorted((landing / "good").glob("*.png"))[:4] + sorted((landing / "crack").glob("*.png"))[:2]:
        (incoming / "line-3" / path.name).write_bytes(path.read_bytes())
    (incoming / "broken.png").write_bytes(b"\x89PNG cut short")
    (incoming / "notes.txt").write_text("not an image")
    (incoming / ".half-written.png").write_bytes(b"")  # a producer still writing: left alone
    result = run_cli(ws, "airflow", "dags", "test", "score_with_champion", check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "9 images scored" not in result.stdout and "8 images scored with models:/anomaly-detector@champion (v1)" \
        in result.stdout
    [csv] = list((ws / "scores").glob("*.csv"))
    import pandas as pd

    table = pd.read_csv(csv, keep_default_na=False)
    assert len(table) == 8 and set(table["model_version"].astype(str)) == {"1"}
    assert {"file", "anomaly_score", "is_anomaly", "model_version", "error", "archived_to"} <= set(table.columns)
    errors = dict(zip(table["file"], table["error"]))
    assert errors["broken.png"] and "not a PNG or JPEG" in errors["notes.txt"]
    scored = table[table["error"] == ""]
    cracks = scored[scored["file"].str.contains("crack")]["anomaly_score"].astype(float)
    goods = scored[scored["file"].str.contains("good")]["anomaly_score"].astype(float)
    assert cracks.min() > goods.median()  # the champion ranks defects above normal surfaces
    # everything moved to the archive exactly once; only the half-written file still waits
    assert sorted(p.name for p in incoming.rglob("*") if p.is_file()) == [".half-written.png"]
    assert all(Path(p).is_file() for p in table["archived_to"])

    again = run_cli(ws, "score-incoming")
    assert "nothing waiting" in again.stdout and len(list((ws / "scores").glob("*.csv"))) == 1


def test_scoring_finishes_what_a_killed_run_left_without_scoring_twice(scoring_ws):
    ws = scoring_ws
    archive = ws / "data" / "scored" / ".inflight"
    good = sorted((ws / "data" / "landing" / "batch-0001" / "good").glob("*.png"))
    # killed after writing results: only the move is left
    (archive / "killed-late").mkdir(parents=True)
    (archive / "killed-late" / "a.png").write_bytes(good[0].read_bytes())
    (ws / "scores" / "killed-late.csv").write_text("file,anomaly_score,is_anomaly,error\na.png,0.5,False,\n")
    # killed before scoring: the claimed file must still be scored
    (archive / "killed-early").mkdir(parents=True)
    (archive / "killed-early" / "b.png").write_bytes(good[1].read_bytes())
    result = run_cli(ws, "score-incoming")
    assert "2 images scored" in result.stdout
    assert (ws / "scores" / "killed-late.csv").read_text().count("\n") == 2  # not scored again
    assert len((ws / "scores" / "killed-early.csv").read_text().splitlines()) == 2
    assert not any(archive.iterdir())
    assert (ws / "data" / "scored" / "killed-late" / "a.png").is_file()
    assert (ws / "data" / "scored" / "killed-early" / "b.png").is_file()

    # a retry under a name already used (its results exist): new files get a new name and are scored
    (ws / "data" / "incoming" / "c.png").write_bytes(good[2].read_bytes())
    retried = run_cli(ws, "score-incoming", "--claim", "killed-late")
    assert "1 images scored" in retried.stdout
    assert len((ws / "scores" / "killed-late-2.csv").read_text().splitlines()) == 2
    assert (ws / "data" / "scored" / "killed-late-2" / "c.png").is_file()


def test_a_second_run_reuses_dvc_cached_stages(ws, first_run):
    result = dags_test(ws, {"epochs": 6})  # the first run's data and params
    assert result.returncode == 0, result.stdout[-4000:]
    # same data and params: DVC restores ingest..evaluate from the shared cache instead of running them
    assert "Running stage 'train'" not in result.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in result.stdout or \
        "Stage 'train' didn't change, skipping" in result.stdout


def test_failed_gates_skip_promote_and_the_run_still_succeeds(ws, worse_run):
    result, states = worse_run.result, worse_run.states
    assert states["register"] == "success" and states["promote"] == "skipped" and states["__run__"] == "success"
    assert worse_run.champion != worse_run.registered
    version = client(ws).get_model_version("anomaly-detector", worse_run.registered)
    assert version.tags["gate_status"] == "failed"
    assert "worse than champion" in version.tags["gate_reasons"]
    assert "not promoted, the champion stays" in result.stdout and "worse than champion" in result.stdout


def test_a_forced_promotion_from_the_form_moves_the_champion_and_says_why(ws, worse_run):
    before = versions(ws)
    reason = "line 4 changed cameras; the old champion is wrong for it"
    result = dags_test(ws, {"epochs": 1, "learning_rate": 0.00001, "force_promote": True, "force_reason": reason})
    assert result.returncode == 0, result.stdout[-4000:]
    assert task_states(ws)["promote"] == "success"
    # the same data and params as the worse run: DVC restored the same model, so no version
    # is added and the force promotes the one registered then, recorded as forced
    forced = worse_run.registered
    assert versions(ws) == before and champion(ws) == forced
    assert "nothing changed since anomaly-detector v" + forced in result.stdout
    tags = client(ws).get_model_version("anomaly-detector", forced).tags
    assert tags["gate_status"] == "failed" and tags["forced_promotion"] == "true"  # forced past failed gates
    assert reason in json.dumps(tags)


def test_forcing_without_a_reason_fails_the_first_task_and_registers_nothing(ws, first_run):
    before, crown = versions(ws), champion(ws)
    result = dags_test(ws, {"force_promote": True})
    assert result.returncode != 0
    states = task_states(ws)
    assert states["ingest"] == "failed" and states["register"] == "upstream_failed"
    assert "force_reason is empty" in result.stdout + result.stderr
    assert versions(ws) == before and champion(ws) == crown
    assert failures(ws)[-1]["task"] == "ingest" and "force_reason" in failures(ws)[-1]["error"]


@pytest.fixture
def refused_file(ws, first_run) -> Iterator[Path]:
    """An empty image in the landing batch, removed afterwards: later runs get the data as it was."""
    path = ws / "data" / "landing" / "batch-0001" / "good" / "zero_bytes.png"
    path.write_bytes(b"")
    yield path
    path.unlink()


def test_refused_data_fails_validate_without_retrying_and_records_the_failure(ws, refused_file):
    before, crown = versions(ws), champion(ws)
    result = dags_test(ws)
    assert result.returncode != 0
    states = task_states(ws)
    assert states["validate"] == "failed" and states["preprocess"] == "upstream_failed"
    output = result.stdout + result.stderr
    assert "validate refused the data" in output and "reports/validation/report.html" in output
    assert "zero_bytes.png" in output
    assert versions(ws) == before and champion(ws) == crown
    record = failures(ws)[-1]
    assert record["task"] == "validate" and record["try_number"] == 1
    run = client(ws).get_run(record["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "validate"
    summary = json.loads((Path(record["workspace"]) / "reports" / "run_summary.json").read_text())
    assert summary["status"] == "failed" and summary["validation"]["success"] is False
