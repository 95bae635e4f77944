"""A person in the loop when gates fail (issue 21, item 6).

The retraining DAG's ``promote`` asks (Airflow's required actions): keep the champion (what a
timeout answers) or promote anyway, with a reason. The first tests check the question and the
refusal of an answer without a reason, on a workspace made by hand. The live ones run a real
Airflow (tests/dags/test_airflow_live.py's): runs whose gates no tiny model passes are answered
over the REST API both ways, then in the UI by Debian's chromium driven by Playwright; the model
version must record the decision, who gave it and why.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace
from pipeline import workspace
from pipeline.orchestrate import KEEP, PROMOTE_ANYWAY, PermanentFailure, approval_question, promote

PROJECT = Path(__file__).resolve().parents[2]
RUN_ID = "manual__2026-12-05T02:00:00+00:00"
# gates no tiny model passes: the question is asked on every run (tests/dags/test_promotion_audit.py)
FAILING_GATES = {"gates": {"min_auroc": 1.0, "min_average_precision": 1.0, "max_fpr": 0.0}}
GATES = {"passed": False, "failed": ["min_auroc", "vs_champion"], "version": "7", "champion_version": "5",
         "gated_against": "5", "run_id": "abc123", "tracking_uri": "sqlite:///mlflow.db",
         "reasons": ["auroc 0.8100 < 0.9", "auroc worse than champion v5 (0.8100 vs 0.9300)"],
         "candidate_metrics": {"auroc": 0.81, "fpr": 0.12, "tp": 15}, "champion_metrics": {"auroc": 0.93, "fpr": 0.05}}


@pytest.fixture
def run_workspace(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(project, workspace) as the DAG's tasks leave them when gates failed: the run's record,
    its params.yaml, gates.json and a plot; the registry holds no answer for the version yet."""
    from pipeline.stages import promote as promote_stage

    monkeypatch.setattr(promote_stage, "recorded_approval", lambda layout, version: None)
    root = workspace.runs_dir(tmp_path) / workspace.key_of(RUN_ID)
    (root / "reports" / "plots").mkdir(parents=True)
    shutil.copy(PROJECT / "params.yaml", root / "params.yaml")
    shutil.copy(PROJECT / "params.yaml", tmp_path / "params.yaml")
    (root / workspace.RECORD).write_text(json.dumps({"run_id": RUN_ID}))
    (root / "reports" / "gates.json").write_text(json.dumps(GATES))
    (root / "reports" / "plots" / "roc.png").write_bytes(b"png")
    return tmp_path, root


def test_the_question_shows_the_evidence_and_the_default(run_workspace):
    project, root = run_workspace
    question = approval_question(project, RUN_ID, {"promoted": False, "version": "7", "reasons": GATES["reasons"]})
    assert question["timeout_hours"] == 24
    assert question["subject"] == "anomaly-detector v7 failed its gates: keep the champion or promote anyway?"
    body = question["body"]
    assert "**anomaly-detector v7** failed its gates against the champion **v5**" in body
    assert "- auroc 0.8100 < 0.9" in body and "- auroc worse than champion v5 (0.8100 vs 0.9300)" in body
    assert "| auroc | 0.8100 | 0.9300 |" in body and "| fpr | 0.1200 | 0.0500 |" in body
    assert "| tp |" not in body  # the rates people decide on, not the confusion counts
    assert str(root / "reports" / "gates.json") in body and "MLflow run `abc123`" in body and "`roc.png`" in body
    assert f"**{KEEP}** leaves v5 serving" in body and "within 24 h" in body


@pytest.mark.parametrize("outcome", [
    {"promoted": True, "version": "7", "champion": "7"},                                 # gates passed
    {"promoted": False, "version": "7", "unchanged_of": "7", "reasons": ["nothing changed since v7"]},
])
def test_nothing_is_asked_when_there_is_nothing_to_decide(run_workspace, outcome):
    assert approval_question(run_workspace[0], RUN_ID, outcome) is None


def test_nothing_is_asked_when_the_timeout_is_zero(run_workspace):
    project, root = run_workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gates"]["approval_timeout_hours"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert approval_question(project, RUN_ID, {"promoted": False, "version": "7", "reasons": ["x"]}) is None


def test_a_task_tried_again_after_the_answer_applies_it_instead_of_asking_twice(run_workspace, monkeypatch):
    from pipeline.stages import promote as promote_stage

    answer = {"decision": PROMOTE_ANYWAY, "by": "alice", "reason": "new supplier"}
    monkeypatch.setattr(promote_stage, "recorded_approval", lambda layout, version: version == "7" and answer)
    assert approval_question(run_workspace[0], RUN_ID, {"promoted": False, "version": "7", "reasons": ["x"]}) == \
        {"answered": answer}


@pytest.mark.parametrize("approval, message", [
    ({"decision": PROMOTE_ANYWAY, "by": "alice", "reason": "  "}, "alice chose 'promote anyway' without a reason"),
    ({"decision": PROMOTE_ANYWAY, "by": "alice", "reason": None}, "champion stays"),
    ({"decision": "approve", "by": "alice", "reason": "x"}, "unknown decision 'approve'"),
])
def test_promote_anyway_without_a_reason_is_refused_before_anything_moves(run_workspace, approval, message):
    with pytest.raises(PermanentFailure, match=message):
        promote(run_workspace[0], RUN_ID, approval=approval)


# ---------------------------------------------------------------------------- a live Airflow


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    from test_airflow_live import running_airflow

    root = tmp_path_factory.mktemp("approval")
    with running_airflow(root, make_workspace(root / "project", FAILING_GATES)) as server:
        yield server


def _asked(airflow, conf: dict) -> str:
    """Trigger a run and wait until its promote task asks; the run's id."""
    from test_airflow_live import DAG_ID, wait_for

    status, body = airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    assert status == 200, body
    status, run = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run

    def asking():
        airflow.check_alive()
        state = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}")[1].get("state")
        assert state in ("queued", "running"), f"run {run['dag_run_id']} ended ({state}) without asking:\n{airflow.tail()}"
        return _hitl(airflow, run["dag_run_id"])[0] == 200

    wait_for(asking, 600, f"run {run['dag_run_id']}'s promote to ask", every=3)
    # Airflow 3.3.2 fails a task resumed before the scheduler has seen its parking process exit
    # ("killed externally"), and the retry asks again: answer after that, as a person would
    parked = f"Received executor event with state success for task instance TaskInstanceKey(dag_id='{DAG_ID}', " \
             f"task_id='promote', run_id='{run['dag_run_id']}', try_number=1"
    wait_for(lambda: parked in (airflow.logs / "scheduler.log").read_text(), 120,
             "the scheduler to see promote park", every=1)
    return run["dag_run_id"]


def _hitl(airflow, run_id: str, answer: dict | None = None) -> tuple[int, dict]:
    from test_airflow_live import DAG_ID

    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/promote/-1/hitlDetails"
    return airflow.request("PATCH", path, answer) if answer is not None else airflow.request("GET", path)


def _finished(airflow, run_id: str) -> dict[str, str]:
    """Wait for the run to end; its task states, and the run's as ``__run__``."""
    from test_airflow_live import DAG_ID, task_instances, wait_for

    def ended():
        state = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")[1].get("state")
        return state if state in ("success", "failed") else None

    try:
        state = wait_for(ended, 300, f"run {run_id} to finish after the answer", every=2)
    except AssertionError:  # what promote did with the answer
        logs = sorted((airflow.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=promote").glob("*"))
        print(airflow.tail(), *(log.read_text()[-6000:] for log in logs), sep="\n")
        raise
    return {**{task: ti["state"] for task, ti in task_instances(airflow, run_id).items()}, "__run__": state}


def _registry(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _version_of(airflow, run_id: str):
    from test_airflow_live import mlflow_run_of

    client = _registry(airflow.ws)
    run = mlflow_run_of(airflow.ws, run_id)
    [version] = client.search_model_versions(f"name = 'anomaly-detector' and run_id = '{run.info.run_id}'")
    return client.get_model_version("anomaly-detector", version.version)


def _champion(airflow) -> str | None:
    try:
        return _registry(airflow.ws).get_model_version_by_alias("anomaly-detector", "champion").version
    except Exception:  # no alias yet
        return None


@pytest.mark.slow
@pytest.mark.e2e
def test_the_rest_api_answers_keep_the_champion_and_the_version_records_it(airflow):
    run_id = _asked(airflow, {"epochs": 1})
    status, detail = _hitl(airflow, run_id)
    assert detail["options"] == [KEEP, PROMOTE_ANYWAY] and detail["defaults"] == [KEEP], detail
    assert "failed its gates" in detail["body"] and "gates.json" in detail["body"], detail["body"]
    assert detail["response_received"] is False
    before = _champion(airflow)

    status, body = _hitl(airflow, run_id, {"chosen_options": [KEEP], "params_input": {"reason": None}})
    assert status == 200 and body["responded_by"]["name"] == "admin", body
    states = _finished(airflow, run_id)
    assert states["promote"] == "skipped" and states["__run__"] == "success", (states, airflow.tail())
    tags = _version_of(airflow, run_id).tags
    assert tags["approval_decision"] == KEEP and tags["approved_by"] == "admin", tags
    assert tags["gate_status"] == "failed" and "promoted_at" not in tags, tags
    assert _champion(airflow) == before
    # answered once: a second answer is refused
    assert _hitl(airflow, run_id, {"chosen_options": [PROMOTE_ANYWAY], "params_input": {"reason": "x"}})[0] == 409


@pytest.mark.slow
@pytest.mark.e2e
def test_the_rest_api_answers_promote_anyway_with_a_reason_and_the_version_becomes_champion(airflow):
    run_id = _asked(airflow, {"epochs": 2})
    reason = "line 3 retooled: the old champion misses the new defect"
    status, body = _hitl(airflow, run_id, {"chosen_options": [PROMOTE_ANYWAY], "params_input": {"reason": reason}})
    assert status == 200, body
    answered_at = _hitl(airflow, run_id)[1]["responded_at"]
    states = _finished(airflow, run_id)
    assert states["promote"] == "success" and states["__run__"] == "success", (states, airflow.tail())
    version = _version_of(airflow, run_id)
    tags = version.tags
    assert _champion(airflow) == version.version
    assert tags["approval_decision"] == PROMOTE_ANYWAY and tags["approved_by"] == "admin", tags
    assert tags["approval_reason"] == reason == tags["promotion_reason"], tags
    assert tags["forced_promotion"] == "true" and tags["promoted_by"] == "admin", tags

    # run again (cleared, as a retry runs it) it applies the recorded answer: nobody is asked twice
    from test_airflow_live import DAG_ID, task_instances

    status, body = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
        "dag_run_id": run_id, "task_ids": ["promote"], "dry_run": False, "only_failed": False})
    assert status == 200 and [ti["task_id"] for ti in body["task_instances"]] == ["promote"], body
    states = _finished(airflow, run_id)
    assert states["promote"] == "success" and states["__run__"] == "success", (states, airflow.tail())
    assert task_instances(airflow, run_id)["promote"]["try_number"] == 2
    # it finished with nobody answering again: had it asked, it would still be awaiting input
    assert _hitl(airflow, run_id)[1]["responded_at"] == answered_at
    assert _champion(airflow) == version.version and _version_of(airflow, run_id).tags["approved_by"] == "admin"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_browser_approves_a_model_whose_gates_failed(airflow, tmp_path):
    from playwright.sync_api import sync_playwright
    from test_airflow_live import CHROMIUM, CHROMIUM_FLAGS, DAG_ID, sign_in, wait_for

    assert Path(CHROMIUM).exists(), "chromium is missing: `make test` installs it (Debian package chromium)"
    shots = Path(os.environ.get("ANOMALY_PIPELINE_SCREENSHOTS") or tmp_path)
    run_id = _asked(airflow, {"epochs": 3})
    reason = "approved in the UI: reviewed the plots"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            sign_in(page, airflow)
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}/tasks/promote/required_actions")
            page.get_by_text("failed its gates").first.wait_for(timeout=30_000)
            page.locator("input[name=element_reason], textarea[name=element_reason]").first.fill(reason)
            page.screenshot(path=str(shots / "airflow_required_action.png"), full_page=True)
            page.get_by_role("button", name=PROMOTE_ANYWAY, exact=True).click()
            detail = wait_for(lambda: (lambda d: d if d.get("response_received") else None)(_hitl(airflow, run_id)[1]),
                              30, "the answer sent from the page")
        finally:
            browser.close()
    assert detail["chosen_options"] == [PROMOTE_ANYWAY] and detail["responded_by_user"]["name"] == "admin", detail
    states = _finished(airflow, run_id)
    assert states["promote"] == "success", (states, airflow.tail())
    version = _version_of(airflow, run_id)
    assert _champion(airflow) == version.version
    tags = version.tags
    assert tags["approval_decision"] == PROMOTE_ANYWAY and tags["approval_reason"] == reason, tags
    assert tags["approved_by"] == "admin" == tags["promoted_by"], tags


@pytest.mark.slow
@pytest.mark.e2e
def test_unanswered_the_question_times_out_to_keep_the_champion_and_says_nobody_answered(airflow):
    from test_airflow_live import wait_for

    params_file = airflow.ws / "params.yaml"
    saved = params_file.read_text()
    params = yaml.safe_load(saved)
    params["gates"]["approval_timeout_hours"] = 0.002  # 7.2 s; the scheduler sweeps every 15 s
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        run_id = _asked(airflow, {"epochs": 4})
        before = _champion(airflow)
        detail = wait_for(lambda: (lambda d: d if d.get("response_received") else None)(_hitl(airflow, run_id)[1]),
                          120, "the timeout to answer for nobody", every=3)
    finally:
        params_file.write_text(saved)
    assert detail["chosen_options"] == [KEEP] and detail["responded_by_user"] is None, detail
    states = _finished(airflow, run_id)
    assert states["promote"] == "skipped" and states["__run__"] == "success", (states, airflow.tail())
    tags = _version_of(airflow, run_id).tags
    assert tags["approval_decision"] == KEEP and tags["approved_by"].startswith("nobody: no answer in time"), tags
    assert "promoted_at" not in tags and _champion(airflow) == before
