"""The gates a candidate must pass before promotion: the absolute bounds of params.yaml's
``gates``, and "not worse than the champion" with the champion re-scored by its own served
model on this run's test split. register gates a new version with it; promote calls it again
when the champion moved in between. The rules themselves are components/gates.py."""
from __future__ import annotations

import numpy as np
import pandas as pd

from detector.serving import score_frame
from pipeline.layout import Layout


def metrics_of(predictions: pd.DataFrame, labels: np.ndarray) -> dict:
    """Metrics from a served model's own scores and flags (so its own threshold applies)."""
    from components.metrics import evaluate

    scores = predictions["anomaly_score"].to_numpy(np.float64)
    flags = predictions["is_anomaly"].to_numpy(bool)
    metrics = evaluate(scores, labels, threshold=np.inf)  # ranking metrics only
    tp, fp = int((flags & (labels == 1)).sum()), int((flags & (labels == 0)).sum())
    fn, tn = int((~flags & (labels == 1)).sum()), int((~flags & (labels == 0)).sum())
    metrics.update(
        tp=tp, fp=fp, fn=fn, tn=tn, threshold=None,
        precision=tp / (tp + fp) if tp + fp else 0.0, recall=tp / (tp + fn) if tp + fn else None,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None, fpr=fp / (fp + tn) if fp + tn else None)
    return metrics


def compare(layout: Layout, candidate: dict, champion_version: str | None, test: pd.DataFrame,
            labels: np.ndarray) -> tuple[list, dict | None, str]:
    """All gates for a candidate: the absolute bounds, and not worse than champion_version
    re-scored by its own served model on this run's test split.

    Returns (gates, champion metrics or None, note). A champion that cannot score is
    no bar to clear; the note says why. promote calls this again when the champion
    moved after register compared against it.
    """
    import mlflow

    from components import gates as gate_rules

    config = layout.config
    champion, note = None, ""
    if champion_version is not None:
        name = config.registry.model_name
        try:
            champion_model = mlflow.pyfunc.load_model(f"models:/{name}/{champion_version}")
            champion = metrics_of(score_frame(champion_model, test), labels)
        except Exception as error:
            note = f"champion v{champion_version} could not be scored on this test split: {error}"
    results = gate_rules.absolute_gates(candidate, config.gates.min_auroc, config.gates.min_average_precision,
                                        config.gates.max_fpr)
    results += gate_rules.champion_gates(
        candidate, champion, {k: v.model_dump() for k, v in config.gates.vs_champion.items()},
        champion_version if champion is not None else None)
    return results, champion, note
