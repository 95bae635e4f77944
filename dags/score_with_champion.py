"""score_with_champion: score the images (or, for data.kind table, the records of the CSV and
Parquet files) waiting in the incoming folder with the champion.

Runs whenever the retraining DAG moves the champion (the Asset its promote task
updates) and on its own schedule (``schedule.score_cron`` in params.yaml). Every
waiting file is scored exactly once and then moved to the archive; results are one
CSV per run (file, [row,] anomaly_score, is_anomaly, error, model_version, ...). See
pipeline/score.py for how nothing is scored twice or lost when a run is killed.

Each batch is recorded on the champion's monitoring run (pipeline/monitoring.py); when its
drift test fires, ``drift_alarm`` emits the drift Asset and the retraining DAG starts.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

# The project whose pipeline this runs: the folder above dags/, unless set. It goes first
# on sys.path so that this checkout's own pipeline/ and dags/common.py are the ones used.
PROJECT = Path(os.environ.get("ANOMALY_PIPELINE_PROJECT") or Path(__file__).resolve().parents[1])
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from dags.common import CHAMPION, DRIFT, MODEL_NAME, PARAMS, record_failure


@task(retries=2, retry_delay=timedelta(minutes=1), retry_exponential_backoff=2.0,
      execution_timeout=timedelta(hours=1), on_failure_callback=record_failure)
def score_incoming(**context) -> dict:
    from pipeline import orchestrate, score
    from pipeline.workspace import key_of

    layout = orchestrate.project_layout(PROJECT)
    return score.incoming(layout, key_of(context["run_id"]), f"models:/{MODEL_NAME}@champion")


@dag(
    dag_id="score_with_champion",
    description="Score incoming images or records with models:/<model>@champion; results as CSV, inputs archived",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(PARAMS.get("schedule", {}).get("score_cron", "*/30 * * * *"), timezone="UTC",
                                       run_immediately=False),
        assets=[CHAMPION]),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "mlops"},
    tags=["anomaly-detection", "scoring", "mlflow"],
    doc_md=__doc__,
)
def score_with_champion():
    drift_alarm(score_incoming())


@task(outlets=[DRIFT])
def drift_alarm(summary: dict, **context) -> dict:
    """Emits the drift Asset (the retraining DAG runs on it) when the champion's monitor fired on
    this run's batches; skipped, so no event, otherwise."""
    fired = [m for m in summary.get("monitor", []) if m.get("fired_now")]
    if not fired:
        raise AirflowSkipException("the champion's monitor did not fire")
    context["outlet_events"][DRIFT].extra = {"version": str(fired[0]["version"]), "claim": fired[0]["claim"],
                                             "fired_at": fired[0].get("fired_at"),
                                             "monitoring_run_id": fired[0]["monitoring_run_id"]}
    return fired[0]


score_with_champion()
