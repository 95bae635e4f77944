"""The champion is watched: every scored batch of incoming items is recorded on a monitoring
run of the model version that scored it, and a sequential test of its flagged rate
(components/monitoring.py) says when the line has changed.

Per version, one MLflow run (experiment ``<registry.experiment>-monitoring``, tagged
``monitoring_of = <model>/<version>``) holds, as time series stepped by the running count of
items: the batch's size, flagged rate and p-value summary, and the monitor's evidence. Its
``monitor/state.json`` artifact is the monitor's state between batches (a few numbers, and
the claims already counted, so a retried scoring task does not count a batch twice), and
``monitor/history.png`` plots the series.

The promise watched is the version's FPR bound (method ``fpr``; its ``fpr_bound`` tag): a
normal item is flagged with probability at most that. A version calibrated otherwise (f1,
recall) makes no such promise; its batches are still recorded, but nothing is tested.

When the test fires: a line in ``runs/alerts.jsonl``, a ``drift_alarm`` tag on the version and
the monitoring run, and ``fired_now`` in what ``record_batch`` returns, on which the scoring
DAG emits the drift Asset that starts a retraining.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.layout import Layout

ALERTS = "alerts.jsonl"
TAG = "monitoring_of"
STATE = "monitor/state.json"
LEVEL = 0.01          # the monitor's false alarm probability over a version's whole life
KEEP_CLAIMS = 500     # claims remembered against double counting (a retry comes within hours)


def _run(client, layout: Layout, name: str, version: str) -> str:
    from pipeline import tracking
    from pipeline.registry import ensure_experiment

    experiment = ensure_experiment(client, f"{layout.config.registry.experiment}-monitoring",
                                   tracking.store(layout).artifact_root)
    found = client.search_runs([experiment], filter_string=f"tags.{TAG} = '{name}/{version}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"monitor-{name}-v{version}", tags={TAG: f"{name}/{version}"})
    return run.info.run_id


def _state(client, run_id: str) -> dict | None:
    from mlflow.exceptions import MlflowException

    try:
        return json.loads(Path(client.download_artifacts(run_id, STATE)).read_text())
    except (MlflowException, OSError):  # the first batch of this version: no state yet
        return None


def _alpha(tags: dict) -> float | None:
    if tags.get("calibration_method") != "fpr":
        return None
    try:
        bound = float(tags.get("fpr_bound") or "nan")
    except ValueError:
        return None
    return bound if 0 < bound < 1 else None


def _plot(client, run_id: str) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {key: client.get_metric_history(run_id, key)
              for key in ("flagged_rate", "p_value_median", "log10_evidence")}
    figure, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for key in ("flagged_rate", "p_value_median"):
        points = sorted((m.step, m.value) for m in series[key])
        if points:
            axes[0].plot(*zip(*points), marker="o", label=key.replace("_", " "))
    axes[0].set_ylabel("per batch")
    axes[0].legend()
    points = sorted((m.step, m.value) for m in series["log10_evidence"])
    if points:
        axes[1].plot(*zip(*points), marker="o", label="log10 evidence against the FPR promise")
        axes[1].axhline(math.log10(1 / LEVEL), color="red", linestyle="--", label=f"alarm (1/{LEVEL:g})")
        axes[1].legend()
    axes[1].set_xlabel("items scored by this version")
    figure.tight_layout()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "history.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        client.log_artifact(run_id, str(path), "monitor")


def record_batch(layout: Layout, version: str, table: pd.DataFrame, claim: str) -> dict:
    """Record one scored batch (the rows of ``score_files``) against ``version``; returns what
    happened: the batch's figures, the monitor's evidence, and whether it fired on this batch.
    Rows that could not be scored take no part (they are flagged, but say nothing of the model)."""
    from mlflow.entities import Metric

    from components.monitoring import RateMonitor
    from pipeline import tracking, workspace
    from pipeline.registry import connect

    client = connect(tracking.store(layout))
    name = layout.config.registry.model_name
    tags = client.get_model_version(name, version).tags
    run_id = _run(client, layout, name, version)
    state = _state(client, run_id) or {"claims": [], "monitor": None, "items": 0}
    result = {"version": version, "monitoring_run_id": run_id, "claim": claim}
    if claim in state["claims"]:  # a retried task: this batch is counted already
        return {**result, "counted_before": True, "fired_now": False,
                "fired": bool((state["monitor"] or {}).get("fired_at"))}
    scored = table[table["error"].fillna("").astype(str) == ""]
    flags = scored["is_anomaly"].astype(str).str.lower().eq("true").to_numpy()
    items = state["items"] + len(scored)
    result.update(items=len(scored), flagged=int(flags.sum()),
                  flagged_rate=float(flags.mean()) if len(flags) else None)
    metrics = {"batch_items": float(len(scored))}
    if len(scored):
        metrics["flagged_rate"] = result["flagged_rate"]
    if "p_value" in scored and len(scored):
        p = scored["p_value"].astype(float).to_numpy()
        metrics.update(p_value_median=float(np.median(p)), p_value_mean=float(np.mean(p)),
                       p_value_share_below_0_05=float(np.mean(p <= 0.05)))
    alpha = _alpha(tags)
    fired_now = False
    if alpha is not None:
        if state["monitor"] is None:
            state["monitor"] = RateMonitor(alpha=alpha, level=LEVEL).as_dict()
        monitor = RateMonitor.from_dict(state["monitor"])
        fired_now = monitor.update(flags)
        state["monitor"] = monitor.as_dict()
        metrics["log10_evidence"] = monitor.log_evidence / math.log(10)
        result.update(alpha=alpha, evidence=monitor.evidence, fired=monitor.fired, fired_at=monitor.fired_at)
    else:
        result.update(alpha=None, fired=False, note="the version makes no FPR promise (method "
                      f"{tags.get('calibration_method') or 'unknown'}): recorded, not tested")
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, items) for key, value in metrics.items()])
    state["items"] = items
    state["claims"] = (state["claims"] + [claim])[-KEEP_CLAIMS:]
    client.log_dict(run_id, state, STATE)
    _plot(client, run_id)
    result["fired_now"] = fired_now
    if fired_now:
        alert = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": name, "version": version,
                 "alpha": alpha, "level": LEVEL, "items": items, "fired_at": result["fired_at"],
                 "evidence": result["evidence"], "claim": claim, "monitoring_run_id": run_id,
                 "message": f"{name} v{version} flags normal-looking items more often than its FPR bound "
                            f"{alpha:.4f} allows (evidence {result['evidence']:.3g} >= {1 / LEVEL:g}): the input "
                            "may have drifted; a retraining is triggered"}
        path = workspace.runs_dir(layout.root) / ALERTS
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.write(json.dumps(alert) + "\n")
        note = f"fired at item {result['fired_at']} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
        client.set_model_version_tag(name, version, "drift_alarm", note)
        client.set_tag(run_id, "drift_alarm", note)
        print(f"monitor: DRIFT ALARM: {alert['message']}; recorded in {path}")
    elif alpha is None:
        print(f"monitor: v{version}: {result['note']}")
    else:
        print(f"monitor: v{version}: {len(scored)} items, flagged rate {result['flagged_rate'] or 0:.4f} against "
              f"bound {alpha:.4f}, evidence {result['evidence']:.3g} (alarm at {1 / LEVEL:g})")
    return result
