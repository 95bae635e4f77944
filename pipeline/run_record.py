"""The MLflow run of one retraining, from start to summary, for the CLI's whole run
(pipeline.runner) and for the Airflow tasks (pipeline.orchestrate) alike.

The run is created first, so the train stage can log its per-epoch loss into it live
(``stage_env`` hands it to every stage). It ends FAILED with the validation report attached
when a stage stops the pipeline (``fail``); after promote, ``finish`` sums up what was
trained, gated and promoted. Both write ``run_summary`` and print it (``print_summary``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.io import read_json, write_json
from pipeline.layout import Layout


def start(layout: Layout, trigger: str, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run that the whole retraining logs into; returns its id."""
    from pipeline.registry import connect, ensure_experiment, promotion_lock
    from pipeline import tracking

    store = tracking.store(layout)
    # Two runs starting at once on a new SQLite store both ran MLflow's schema migrations
    # and one failed ("Online migration expected to match one row"); the registry's lock
    # file (one writer at a time on this store) makes the second wait for the first.
    with promotion_lock(tracking.promotion_lock(layout) if tracking.local_store(layout) else None):
        client = connect(store)
        experiment_id = ensure_experiment(client, layout.config.registry.experiment, store.artifact_root)
    ml_run = client.create_run(experiment_id, run_name=time.strftime("retrain-%Y%m%d-%H%M%S"),
                               tags={"pipeline": "retrain", "trigger": trigger, **(tags or {})})
    print(f"run: MLflow run {ml_run.info.run_id} in experiment '{layout.config.registry.experiment}' "
          f"at {tracking.shown(store.tracking_uri)}")
    return ml_run.info.run_id


def stage_env(layout: Layout, run_id: str) -> dict[str, str]:
    """What a stage subprocess needs: the run to log into, the store, this venv's tools.

    Light on purpose: every Airflow stage task calls it in its own process, and going
    through tracking.store (pipeline.registry) imported mlflow and pandas there, 7-10 s
    per task (benchmarks/orchestration.py)."""
    from pipeline import tracking

    uri, artifacts = tracking.tracking_uri(layout), tracking.artifact_root(layout)
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if artifacts:
        env["MLFLOW_ARTIFACT_ROOT"] = artifacts
    env.update(tracking.client_env(uri))
    return env


def fail(layout: Layout, run_id: str, stage: str, error: str = "") -> dict:
    """End the MLflow run FAILED with the validation report attached; write and print the summary.

    The error is scrubbed first (pipeline.secrets): MLflow's exception texts hold the tracking
    URL, with any password in it, and it goes to a tag, the summary and the log."""
    from pipeline.registry import connect
    from pipeline import tracking
    from pipeline.secrets import scrub

    error = scrub(error)
    client = connect(tracking.store(layout))
    if layout.validation_dir.is_dir():
        client.log_artifacts(run_id, str(layout.validation_dir), "validation")
    client.set_tag(run_id, "failed_stage", stage)
    if error:
        client.set_tag(run_id, "error", error[:4900])
    client.set_terminated(run_id, "FAILED")
    return _written(layout, {
        "status": "failed", "run_id": run_id, "failed_stage": stage, "error": error,
        "validation": _validation(layout),
        "message": f"the pipeline stopped at {stage}; nothing was registered or promoted"
        if stage not in ("register", "promote") else f"the pipeline stopped at {stage}; the champion was not moved"})


def abandon(layout: Layout, run_id: str) -> None:
    """End the MLflow run FAILED, nothing more: register or promote raised, and its error goes
    on to the caller (the champion is untouched unless promote finished)."""
    from pipeline.registry import connect
    from pipeline import tracking

    connect(tracking.store(layout)).set_terminated(run_id, "FAILED")


def finish(layout: Layout, run_id: str, report: dict, promotion: dict, seconds: float | None = None) -> dict:
    """Write and print the summary of a retraining that got through register and promote."""
    return _written(layout, {
        "status": "finished", "run_id": run_id, "seconds": seconds,
        "validation": _validation(layout), "train": read_json(layout.train_metrics),
        "calibration": read_json(layout.threshold), "metrics": read_json(layout.metrics),
        "gates": {k: report[k] for k in ("passed", "failed", "reasons")},
        "version": report["version"], "unchanged_of": report.get("unchanged_of"), "promotion": promotion})


def _written(layout: Layout, summary: dict) -> dict:
    """The summary scrubbed (an error text, the gate report's champion note and a promotion's
    reasons can name the tracking URL), written to ``run_summary`` and printed."""
    from pipeline.secrets import scrub_data

    summary = scrub_data(summary)
    write_json(layout.run_summary, summary)
    print_summary(layout, summary)
    return summary


def _validation(layout: Layout) -> dict:
    return read_json(layout.validation_summary) if layout.validation_summary.is_file() else {}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_summary(layout: Layout, summary: dict) -> None:
    """The summary as a person reads it at the end of a run (or again with ``pipeline summary``)."""
    from pipeline import tracking
    from pipeline.kinds import kind_of

    name = layout.config.registry.model_name
    validation = summary.get("validation") or {}
    lines = ["", "=" * 27 + " retraining summary " + "=" * 27]
    if validation:
        counts = ", ".join(f"{k} {v}" for k, v in validation.get("label_counts", {}).items())
        verdict = "passed" if validation.get("success") else "FAILED"
        lines.append(f"validation   {verdict}: {validation.get('n_files', 0)} {layout.unit} ({counts})")
        for failure in validation.get("failures", []):
            lines.append(f"               - {failure['description']}")
        drift = validation.get("drift")
        if drift and not drift.get("refused"):  # a refusal is one of the failures above
            lines.append(f"drift        {drift['message']}")
        if not validation.get("success"):
            lines.append(f"             report: {layout.validation_html}")
    if summary["status"] != "finished":
        lines += [f"result       {summary['message']}", f"MLflow run   {summary['run_id']} (FAILED)"]
        if summary.get("error"):
            lines.append(f"error        {summary['error'].strip().splitlines()[-1][:300]}")
    else:
        train, calibration, metrics = summary["train"], summary["calibration"], summary["metrics"]
        bound = calibration.get("fpr_bound")
        if "bank_size" in train:  # a feature family: fitted in one pass on a pretrained backbone
            training = (f"training     {train['family']} on {train['device']} ({train['backbone']}, pretrained "
                        f"{train['weights_source']}), fitted on {train['fit_images']} normal {layout.unit}, "
                        f"bank {train['bank_size']}, {train['seconds']:.1f} s")
        else:
            training = (f"training     {train['family']} on {train['device']}, {train['epochs']} epochs, "
                        f"{train.get('train_items', train.get('train_images'))} {layout.unit}, {train['seconds']:.1f} s")
        lines += [
            training,
            f"threshold    {calibration['threshold']:.6g} (method {calibration['method']}"
            + (f", FPR guarantee <= {bound:.4f}" if bound is not None else "")
            + (f"; FPR <= {calibration['conditional_fpr_bound']:.4f} with probability {calibration['confidence']} "
               f"for this calibration set of {calibration['n_normal']} normals"
               if calibration.get("conditional_fpr_bound") is not None else "") + ")"
            + (f"  NOTE: {calibration['note']}" if calibration.get("note") else ""),
            f"test         AUROC {_fmt(metrics['auroc'])}  AP {_fmt(metrics['average_precision'])}  "
            f"precision {_fmt(metrics['precision'])}  recall {_fmt(metrics['recall'])}  F1 {_fmt(metrics['f1'])}  "
            f"FPR {_fmt(metrics['fpr'])}  ({metrics['n']} {layout.unit}, {metrics['n_anomalous']} anomalous)",
            f"registered   {name} v{summary['version']} (MLflow run {summary['run_id']})" if not
            summary.get("unchanged_of") else f"registered   nothing: data, params, code and weights are those of "
            f"{name} v{summary['version']} (this run: MLflow run {summary['run_id']})",
        ]
        promotion = summary["promotion"]
        if promotion.get("promoted"):
            lines.append(f"champion     v{promotion['champion']} is now the champion"
                         + (f" (previous: v{promotion['previous']})" if promotion.get("previous") else "")
                         + (" [FORCED]" if promotion.get("forced") else ""))
        else:
            lines.append(f"champion     unchanged; v{summary['version']} not promoted:")
            lines += [f"               - {r}" for r in promotion.get("reasons", [])] or \
                     [f"               - {promotion.get('note', '')}"]
        if summary.get("seconds") is not None:
            lines.append(f"took         {summary['seconds']:.0f} s")
    lines += [
        "next         MLflow UI:  make mlflow   (MLFLOW_TRACKING_URI=" + tracking.shown(tracking.tracking_uri(layout))
        + ")",
        f"             score:      .venv/bin/python -m pipeline score <folder of "
        f"{kind_of(layout.config).landing_files}> --out scores.csv",
        f"             in Python:  mlflow.pyfunc.load_model('models:/{name}@champion')",
        "=" * 74,
    ]
    print("\n".join(lines))
