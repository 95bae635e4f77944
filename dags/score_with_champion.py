"""score_with_champion: score the images (or, for data.kind table, the records of the CSV and
Parquet files) waiting in the incoming folder with the champion.

Runs whenever the retraining DAG moves the champion (the Asset its promote task
updates) and on its own schedule (``schedule.score_cron`` in params.yaml). Every
waiting file is scored exactly once and then moved to the archive; results are one
CSV per run (file, [row,] anomaly_score, is_anomaly, error, model_version, ...). See
pipeline/score.py for how nothing is scored twice or lost when a run is killed.
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
from dags.common import CHAMPION, MODEL_NAME, PARAMS, record_failure


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
    score_incoming()


score_with_champion()
