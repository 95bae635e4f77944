"""One whole retraining in this process, the CLI's ``run``: dvc repro (ingest .. evaluate),
then register and promote, in one MLflow run (pipeline.run_record). Airflow takes the same
steps task by task (pipeline.orchestrate); each step is written once, in pipeline.steps,
pipeline.run_record and pipeline.stages.
"""
from __future__ import annotations

import os
import sys
import time

from pipeline import run_record, steps
from pipeline.layout import Layout


def run(layout: Layout, force: bool = False, reason: str = "") -> int:
    """The whole retraining; returns the CLI's exit code (EXIT_DATA_ERROR when a stage refused the data)."""
    from pipeline.stages import promote, register

    started = time.time()
    run_id = run_record.start(layout, os.environ.get("PIPELINE_TRIGGER", "cli"))
    env = run_record.stage_env(layout, run_id)
    try:
        steps.repro(layout.root, env, merge=False)
    except steps.ReproFailed as failed:
        run_record.fail(layout, run_id, failed.stage or "dvc repro", failed.message)
        print(f"error: {failed.message}", file=sys.stderr)
        return failed.exit_code
    except BaseException as error:  # SIGTERM or Ctrl-C: the stages were stopped; the run did not finish
        run_record.fail(layout, run_id, "dvc repro", str(error) or type(error).__name__)
        raise
    steps.push_data(layout.root, env, "run", merge=False)
    try:
        report = register.run(layout, run_id=run_id)
        promotion = promote.run(layout, version=report["version"], force=force, reason=reason)
    except BaseException:
        run_record.abandon(layout, run_id)
        raise
    run_record.finish(layout, run_id, report, promotion, round(time.time() - started, 1))
    return 0
