"""Evaluation metrics and plots for scores + a threshold on labelled images or rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def evaluate(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """AUROC, AP and the confusion matrix at the threshold (flag = score > threshold).

    Ranking metrics are None when the split holds a single class: there is nothing to rank,
    and a gate on them then fails instead of passing on a made-up number.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    flagged = scores > threshold
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    tn = int((~flagged & (labels == 0)).sum())
    both = 0 < labels.sum() < len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else None,
        "average_precision": float(average_precision_score(labels, scores)) if both else None,
        "precision": float(precision),
        "recall": None if recall is None else float(recall),
        "f1": None if f1 is None else float(f1),
        "fpr": fp / (fp + tn) if fp + tn else None,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "n": int(len(labels)), "n_anomalous": int(labels.sum()),
        "threshold": float(threshold),
    }


def curves(scores: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """ROC and PR curve points (for DVC plots and the PNGs)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    if not 0 < int(np.sum(labels)) < len(labels):
        return {"roc": {"fpr": [], "tpr": []}, "pr": {"recall": [], "precision": []}}
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "pr": {"recall": recall.tolist(), "precision": precision.tolist()}}


def plot_all(scores: np.ndarray, labels: np.ndarray, threshold: float, folder: Path, title: str = "",
             unit: str = "images") -> list[Path]:
    """roc.png, pr.png and score_histogram.png in folder; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    points = curves(scores, labels)
    summary = evaluate(scores, labels, threshold)
    written = []

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(points["roc"]["fpr"], points["roc"]["tpr"], lw=2, label=f"AUROC = {summary['auroc'] or float('nan'):.3f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    if summary["fpr"] is not None and summary["recall"] is not None:
        ax.scatter([summary["fpr"]], [summary["recall"]], c="red", zorder=3, label="at threshold")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC {title}".strip())
    ax.legend(loc="lower right")
    written.append(_save(fig, folder / "roc.png"))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(points["pr"]["recall"], points["pr"]["precision"], lw=2,
            label=f"AP = {summary['average_precision'] or float('nan'):.3f}")
    ax.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02), title=f"Precision-recall {title}".strip())
    ax.legend(loc="lower left")
    written.append(_save(fig, folder / "pr.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    scores = np.asarray(scores)
    log_scale = scores.min() > 0 and scores.max() / scores.min() > 100  # distance scores are heavy-tailed
    bins = np.geomspace(scores.min(), scores.max(), 41) if log_scale else np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[np.asarray(labels) == 0], bins=bins, alpha=0.6, label="normal")
    ax.hist(scores[np.asarray(labels) == 1], bins=bins, alpha=0.6, label="anomaly")
    ax.axvline(threshold, c="red", ls="--", label="threshold")
    ax.set(xlabel="anomaly score" + (" (log scale)" if log_scale else ""), ylabel=unit,
           title=f"Score distribution {title}".strip(), xscale="log" if log_scale else "linear")
    ax.legend()
    written.append(_save(fig, folder / "score_histogram.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
