"""The same DAG files on Airflow's CeleryExecutor with a Postgres metadata database, as
docker/docker-compose.yaml deploys them, for real on loopback: PostgreSQL and Redis
(Debian's), the api-server, scheduler and dag-processor, and two Celery workers: one on the
queue ``default``, one on ``gpu``, as the compose file's airflow-worker and airflow-gpu-worker.

With ``ANOMALY_PIPELINE_TRAIN_ON=queue`` (the compose file's setting) a run triggered over the
REST API succeeds with train sent to the ``gpu`` queue and every other task to ``default``.
Only the gpu worker consumes ``gpu``, so a successful train ran there; its log says so too.
"""
from __future__ import annotations

import pytest

from conftest import make_workspace
from servers import PostgresServer, RedisServer
from test_airflow_live import DAG_ID, LOW_GATES, running_airflow, task_instances, trigger_and_wait

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_run_on_celery_sends_train_to_the_gpu_worker(tmp_path):
    import sys

    postgres, redis = PostgresServer(), RedisServer()
    try:
        postgres.start()
        redis.start()
        postgres.create("airflow")
        database = postgres.uri("airflow")
        celery = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
            "AIRFLOW__CELERY__BROKER_URL": redis.uri,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database,  # SQLAlchemy 2.1's default driver is psycopg 3
            "ANOMALY_PIPELINE_TRAIN_ON": "queue",
        }
        airflow = [sys.executable, "-m", "airflow"]
        components = {
            "api-server": [*airflow, "api-server"], "scheduler": [*airflow, "scheduler"],
            "dag-processor": [*airflow, "dag-processor"],
            "worker": [*airflow, "celery", "worker", "--queues", "default", "--concurrency", "2"],
            "gpu-worker": [*airflow, "celery", "worker", "--queues", "gpu", "--concurrency", "1",
                           "--celery-hostname", "gpu@%h"],
        }
        ws = make_workspace(tmp_path / "project", LOW_GATES)
        with running_airflow(tmp_path, ws, celery, components) as server:
            run_id, state = trigger_and_wait(server, {"epochs": 2}, timeout=900)
            assert state == "success", server.tail()
            instances = task_instances(server, run_id)
            assert {task: ti["state"] for task, ti in instances.items()} == \
                {task: "success" for task in instances} and len(instances) == 8
            assert instances["train"]["queue"] == "gpu"
            assert {ti["queue"] for task, ti in instances.items() if task != "train"} == {"default"}
            gpu_log = (server.logs / "gpu-worker.log").read_text()
            assert "task_id='train'" in gpu_log and "task_id='ingest'" not in gpu_log, gpu_log[-3000:]
        # the run's records are in Postgres, where the compose file keeps them
        assert postgres.execute("airflow", f"SELECT state FROM dag_run WHERE dag_id = '{DAG_ID}'") == [("success",)]
    finally:
        redis.stop()
        postgres.stop()
