"""Airflow's metadata database and MLflow's tracking store on PostgreSQL, as
docker/docker-compose.yaml deploys them, for real: a PostgreSQL server the test starts on
loopback (Debian's, which `make test` installs), an `mlflow server` with its backend there,
and one retraining DAG run (`airflow dags test`) with Airflow's database there too.

What the run left is read back from Postgres itself, not only through the tools, so a
silent fall-back to a SQLite file would fail the test.
"""
from __future__ import annotations

import pytest

from conftest import make_workspace, run_cli
from servers import MlflowServer, PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DAG_ID = "retrain_anomaly_detector"
TASKS = ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate", "register", "promote")
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    server.start()
    server.create("airflow", "mlflow")
    yield server
    server.stop()


def test_a_dag_run_with_airflow_and_mlflow_on_postgres(postgres, tmp_path):
    from mlflow import MlflowClient

    tracking = MlflowServer(tmp_path, backend=postgres.uri("mlflow"))
    tracking.start()
    try:
        project = make_workspace(tmp_path / "project", {"gates": LOW_GATES, "train": {"epochs": 2},
                                                        "registry": {"tracking_uri": tracking.uri}})
        env = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.uri("airflow"), "AIRFLOW_HOME": str(tmp_path / "af")}
        result = run_cli(project, "airflow", "dags", "test", DAG_ID, check=False, env=env, timeout=900)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

        # Airflow's records of the run, in Postgres (and no SQLite database beside them)
        assert postgres.execute("airflow", f"SELECT state FROM dag_run WHERE dag_id = '{DAG_ID}'") == [("success",)]
        states = dict(postgres.execute("airflow", f"SELECT task_id, state FROM task_instance WHERE dag_id = '{DAG_ID}'"))
        assert states == {task: "success" for task in TASKS}
        assert postgres.execute("airflow", "SELECT slots FROM slot_pool WHERE pool = 'gpu'") == [(1,)]
        assert not list((tmp_path / "af").glob("*.db"))

        # MLflow's: the registered version and the champion alias, in Postgres and through the server
        assert postgres.execute("mlflow", "SELECT name, version FROM model_versions") == [("anomaly-detector", 1)]
        assert postgres.execute("mlflow", "SELECT alias, version FROM registered_model_aliases") == \
            [("champion", 1)]
        client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
        champion = client.get_model_version_by_alias("anomaly-detector", "champion")
        assert champion.tags["airflow_run_id"].startswith("manual__")
        assert not (project / "mlflow.db").exists()
    finally:
        tracking.stop()
