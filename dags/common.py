"""What both DAGs share: the project they run, its params, the champion and drift Assets and
the failure callback. Light on purpose (yaml and the standard library only): the DAG
processor imports it on every parse. Listed in .airflowignore, so it is not parsed as
a DAG file itself.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from airflow.sdk import Asset

PROJECT = Path(os.environ.get("ANOMALY_PIPELINE_PROJECT") or Path(__file__).resolve().parents[1])

PARAMS: dict = yaml.safe_load((PROJECT / "params.yaml").read_text()) or {}
MODEL_NAME: str = PARAMS.get("registry", {}).get("model_name", "anomaly-detector")

# Updated by the retraining DAG's promote task each time the champion alias moves;
# the scoring DAG runs on it. Airflow reserves the 'airflow' scheme; 'x-' is free.
CHAMPION = Asset(name=f"{MODEL_NAME}-champion", uri=f"x-mlflow-model://{MODEL_NAME}/champion",
                 group="mlflow-models")

# Updated by the scoring DAG when the champion's monitor fires (pipeline/monitoring.py: it flags
# normal-looking items more often than its FPR bound allows); the retraining DAG runs on it.
DRIFT = Asset(name=f"{MODEL_NAME}-drift", uri=f"x-anomaly-pipeline://drift/{MODEL_NAME}", group="monitoring")


def record_failure(context) -> None:
    """on_failure_callback: one line per failed task in runs/failures.jsonl, and the run's
    MLflow run marked FAILED with the stage and the error (pipeline.orchestrate)."""
    from pipeline.orchestrate import record_failure as record

    ti = context["task_instance"]
    error = context.get("exception")
    record(PROJECT, context["run_id"], ti.task_id, f"{type(error).__name__}: {error}" if error else "unknown error",
           {"dag_id": ti.dag_id, "try_number": getattr(ti, "try_number", None),
            "log_url": getattr(ti, "log_url", None)})
