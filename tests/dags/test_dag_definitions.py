"""The DAG files as Airflow loads them: no import errors, the stage graph of dvc.yaml,
the scheduling settings an operator relies on, a trigger form that refuses bad input,
and a parse that stays light (the DAG processor re-parses these files all day)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from pipeline import graph
from pipeline.trigger_form import FIELDS

PROJECT = Path(__file__).resolve().parents[2]
DAGS = PROJECT / "dags"
HEAVY = ("torch", "torchvision", "mlflow", "great_expectations", "pandas", "dvc", "sklearn", "matplotlib")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS))


@pytest.fixture(scope="module")
def retrain(dagbag):
    return dagbag.dags["retrain_anomaly_detector"]


def test_both_dags_load_without_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) == {"retrain_anomaly_detector", "score_with_champion"}


def test_tasks_and_edges_are_dvc_yaml_stages_then_register_and_promote(retrain):
    stages = [s.name for s in graph.stages(PROJECT)]
    assert stages == list(yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"])
    assert [t.task_id for t in retrain.tasks] == stages + ["register", "promote"]
    dag_edges = {(t.task_id, down) for t in retrain.tasks for down in t.downstream_task_ids}
    sinks = {s for s in stages if not any(s == up for up, _ in graph.edges(PROJECT))}
    assert sinks == {"evaluate"}
    expected = graph.edges(PROJECT) | {(s, "register") for s in sinks} | {("register", "promote")}
    assert dag_edges == expected
    # the edges are DVC's own reading of deps and outs, not a hand-written chain
    assert ("ingest", "preprocess") in dag_edges and ("train", "evaluate") in dag_edges


def test_graph_follows_a_changed_dvc_yaml(tmp_path):
    """The DAG has no stage list of its own: a stage added to dvc.yaml appears with its edges."""
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    body = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    body["stages"]["explain"] = {"cmd": "python -m pipeline explain", "deps": ["${paths.models}/model.pt"],
                                 "outs": ["${paths.reports}/explain"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    assert ("train", "explain") in graph.edges(tmp_path)
    assert [s.name for s in graph.stages(tmp_path)][-1] == "explain"


def test_scheduling_settings(retrain):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert retrain.timetable.timetable.expression == params["schedule"]["cron"] == "0 2 * * *"
    assert retrain.catchup is False and retrain.max_active_runs == 1
    tasks = {t.task_id: t for t in retrain.tasks}
    assert tasks["train"].pool == "gpu"
    assert all(t.execution_timeout and t.execution_timeout <= timedelta(hours=6) for t in tasks.values())
    assert all(t.on_failure_callback for t in tasks.values())
    # retries where they can help, none where the failure is deterministic
    assert tasks["validate"].retries == 0 and tasks["calibrate"].retries == 0
    assert tasks["train"].retries >= 1 and tasks["register"].retries >= 1 and tasks["ingest"].retries >= 1
    assert all(t.retry_exponential_backoff for t in tasks.values() if t.retries)


def test_promote_updates_the_champion_asset_that_schedules_scoring(dagbag, retrain):
    from airflow.sdk import AssetOrTimeSchedule

    promote = next(t for t in retrain.tasks if t.task_id == "promote")
    [champion] = promote.outlets
    scoring = dagbag.dags["score_with_champion"]
    assert isinstance(scoring.timetable, AssetOrTimeSchedule)
    assert list(scoring.timetable.asset_condition.objects) == [champion]
    assert champion.uri == "x-mlflow-model://anomaly-detector/champion"
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert scoring.timetable.timetable.expression == params["schedule"]["score_cron"]


def test_failed_gates_make_promote_ask_keep_or_promote_anyway_with_keep_on_timeout(retrain):
    """promote is a human-in-the-loop task: its options, the default a timeout applies (keep the
    champion), the timeout from gates.approval_timeout_hours, and the reason field, which only
    the question has (not the DAG's trigger form)."""
    from airflow.providers.standard.operators.hitl import HITLOperator

    from pipeline.orchestrate import KEEP, PROMOTE_ANYWAY

    promote = retrain.task_dict["promote"]
    assert isinstance(promote, HITLOperator)
    assert promote.options == [KEEP, PROMOTE_ANYWAY] == ["keep the champion", "promote anyway"]
    assert promote.defaults == [KEEP] and promote.multiple is False
    hours = yaml.safe_load((PROJECT / "params.yaml").read_text())["gates"]["approval_timeout_hours"]
    assert hours == 24 and promote.response_timeout == timedelta(hours=hours)
    assert promote.execution_timeout == timedelta(minutes=10) and promote.retries == 3  # the promote part's own
    [reason] = promote.serialized_params.values()
    assert list(promote.serialized_params) == ["reason"] and reason["value"] is None
    assert reason["schema"]["type"] == ["null", "string"] and reason["schema"]["maxLength"] == 500
    assert [t.task_id for t in promote.upstream_list] == ["register"] and not promote.downstream_list


def test_the_scoring_dags_drift_alarm_schedules_a_retraining(dagbag, retrain):
    """Nightly or on drift: the retraining runs on its cron or on the drift Asset, which only the
    scoring DAG's drift_alarm task updates (it skips, so no event, unless the monitor fired)."""
    from airflow.sdk import AssetOrTimeSchedule

    scoring = dagbag.dags["score_with_champion"]
    [drift] = next(t for t in scoring.tasks if t.task_id == "drift_alarm").outlets
    assert drift.uri == "x-anomaly-pipeline://drift/anomaly-detector"
    assert isinstance(retrain.timetable, AssetOrTimeSchedule)
    assert list(retrain.timetable.asset_condition.objects) == [drift]
    assert [t.task_id for t in scoring.tasks if drift in t.outlets] == ["drift_alarm"]


@pytest.mark.parametrize("conf, key", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"model_type": "random_forest"}, "model_type"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"target_fpr": 1.0}, "target_fpr"),
    ({"calibration_method": "auc"}, "calibration_method"),
    ({"landing": ""}, "landing"),
])
def test_the_trigger_form_refuses_bad_values(retrain, conf, key):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    params = ParamsDict(copy.deepcopy(retrain.params))
    with pytest.raises(ParamValidationError, match=key):
        params.update(conf)
        params.validate()


def test_the_trigger_form_accepts_good_values_with_params_yaml_defaults(retrain):
    from airflow.sdk.definitions.param import ParamsDict

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    defaults = ParamsDict(copy.deepcopy(retrain.params)).validate()
    assert (defaults["model_type"], defaults["epochs"], defaults["learning_rate"], defaults["calibration_method"],
            defaults["target_fpr"], defaults["landing"]) == (
        params["model"]["type"], params["train"]["epochs"], params["train"]["learning_rate"],
        params["calibration"]["method"], params["calibration"]["target_fpr"], params["data"]["landing"])
    assert defaults["force_promote"] is False and defaults["force_reason"] is None
    form = ParamsDict(copy.deepcopy(retrain.params))
    form.update({"model_type": "autoencoder", "epochs": 3, "learning_rate": 0.01})
    values = form.validate()
    assert values["model_type"] == "autoencoder" and values["epochs"] == 3


def _probes(key: str) -> list:
    """Values to try on a form field: each of the config field's bounds, and a step either side of
    it (read from the pydantic field itself), or each Literal choice and one that is none."""
    import typing

    from pipeline.trigger_form import section

    part, name = key.split(".")
    info = section(part).model_fields[name]
    choices = typing.get_args(info.annotation)
    if choices:
        return [*choices, "no-such-choice"]
    if info.annotation is str:
        return ["", "data/elsewhere"]
    step = 1 if info.annotation is int else 1e-6
    bounds = [getattr(rule, word) for rule in info.metadata for word in ("ge", "gt", "le", "lt")
              if getattr(rule, word, None) is not None]
    assert bounds, f"{key} has no bounds to compare"
    return [value for bound in bounds for value in (bound - step, bound, bound + step)] + (
        [2.5] if info.annotation is int else [])


@pytest.mark.parametrize("name, key", list(FIELDS.items()))
def test_the_trigger_form_accepts_what_the_config_accepts(retrain, name, key):
    """Issue 20 (6): the form's bounds and choices are the typed config's, so a value a run would
    take (epochs 10,000, learning rate 10) is not refused by the form, nor the other way round."""
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.config import ConfigError, parse

    def by_form(value) -> bool:
        try:
            form = ParamsDict(copy.deepcopy(retrain.params))
            form.update({name: value})
            form.validate()
        except ParamValidationError:
            return False
        return True

    def by_config(value) -> bool:
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        part, field = key.split(".")
        params[part][field] = value
        try:
            parse(params)
        except ConfigError as error:
            assert key in str(error)
            return False
        return True

    verdicts = {value: (by_form(value), by_config(value)) for value in _probes(key)}
    assert {value: both for value, both in verdicts.items() if both[0] != both[1]} == {}
    assert {True, False} <= {form for form, _ in verdicts.values()}  # the probes reach both sides


def test_every_dvc_stage_has_task_settings_and_every_setting_a_task():
    """The stage list has one source, dvc.yaml: TASK_SETTINGS covers each stage, then register and
    promote, and names nothing else (a stage renamed in dvc.yaml would run on fallback settings)."""
    from dags.retrain_anomaly_detector import TASK_SETTINGS

    assert list(TASK_SETTINGS) == [s.name for s in graph.stages(PROJECT)] + ["register", "promote"]


def test_parsing_the_dag_folder_is_fast_and_imports_nothing_heavy():
    """In a fresh interpreter, as the DAG processor parses: per-file time and the modules it pulled in."""
    probe = f"""
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
before = set(sys.modules)
started = time.perf_counter()
bag = DagBag({str(DAGS)!r})
total = time.perf_counter() - started
print(json.dumps({{"total": total, "files": {{s.file: s.duration.total_seconds() for s in bag.dagbag_stats}},
                  "heavy": sorted(m for m in {list(HEAVY)!r} if m in sys.modules and m not in before)}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"DAG folder parse: {result}")
    assert result["heavy"] == []
    assert set(result["files"]) == {"retrain_anomaly_detector.py", "score_with_champion.py"}
    # Airflow's own dagbag_import_timeout is 30 s; these files take tens of milliseconds here
    assert max(result["files"].values()) < 2.0, result
