"""Who promoted: a promotion from Airflow records the user who triggered the run, not the DAG's
owner (``mlops``), and a scheduled run records ``scheduler``.

The first tests read the user off Airflow's own DagRun model (the object a task's context holds
in Airflow 3, ``triggering_user_name`` since 3.1). The last one is the real path: a live Airflow
(api-server, scheduler, dag-processor; tests/dags/test_airflow_live.py), a run triggered over
the REST API by the user ``admin`` with a forced promotion past failing gates; the version's
``promoted_by`` must be ``admin``.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import make_workspace


def _dag_run(run_type: str, user: str | None):
    from airflow.sdk.api.datamodels._generated import DagRun, DagRunState, DagRunType

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return DagRun(dag_id="retrain_anomaly_detector", run_id=f"{run_type}__2026-01-01T00:00:00+00:00",
                  logical_date=now, data_interval_start=now, data_interval_end=now, run_after=now, start_date=now,
                  end_date=None, run_type=DagRunType(run_type), state=DagRunState.RUNNING, consumed_asset_events=[],
                  partition_key=None, triggering_user_name=user)


@pytest.mark.parametrize("run_type, user, expected", [
    ("manual", "alice", "alice"),                      # the UI, the REST API, `airflow dags trigger`
    ("backfill", "bob", "bob"),
    ("scheduled", None, "scheduler"),                   # nobody: the schedule started it
    ("asset_triggered", None, "scheduler (asset event)"),
    ("manual", None, "unknown (a manual run with no triggering user)"),
])
def test_the_user_who_triggered_a_run_is_read_off_airflows_dag_run(run_type, user, expected):
    from dags.retrain_anomaly_detector import triggered_by

    assert triggered_by(_dag_run(run_type, user)) == expected


@pytest.mark.slow
@pytest.mark.e2e
def test_a_forced_promotion_triggered_over_the_rest_api_records_that_user(tmp_path):
    from mlflow import MlflowClient
    from test_airflow_live import running_airflow, trigger_and_wait

    # gates no tiny model passes, so the promotion happens only because the trigger forced it
    ws = make_workspace(tmp_path / "project", {"gates": {"min_auroc": 1.0, "min_average_precision": 1.0,
                                                         "max_fpr": 0.0}})
    with running_airflow(tmp_path, ws) as airflow:
        run_id, state = trigger_and_wait(airflow, {"epochs": 1, "force_promote": True,
                                                   "force_reason": "audit: who forced it"})
        assert state == "success", airflow.tail()
        status, dag_run = airflow.request("GET", f"/api/v2/dags/retrain_anomaly_detector/dagRuns/{run_id}")
        assert status == 200 and dag_run["triggering_user_name"] == "admin", dag_run

    uri = f"sqlite:///{Path(ws) / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("anomaly-detector", "champion")
    tags = version.tags
    assert tags["forced_promotion"] == "true" and tags["promotion_reason"] == "audit: who forced it", tags
    assert tags["promoted_by"] == "admin", tags  # not the DAG owner, "mlops"
    assert client.get_run(version.run_id).data.tags["triggered_by"] == "admin"
