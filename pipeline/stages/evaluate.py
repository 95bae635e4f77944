"""evaluate: metrics at the threshold on the test split, ROC/PR/histogram plots."""
from __future__ import annotations

import csv

import pandas as pd

from components.metrics import curves, evaluate, plot_all
from pipeline.io import atomic_path, read_json, write_json
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    scores = pd.read_parquet(layout.scores)
    test = scores[scores["split"] == "test"]
    calibration = read_json(layout.threshold)
    threshold = calibration["threshold"]
    values, labels = test["score"].to_numpy(), test["is_anomaly"].to_numpy()
    metrics = evaluate(values, labels, threshold)
    metrics["fpr_bound"] = calibration.get("fpr_bound")
    metrics["calibration_method"] = calibration["method"]
    per_defect = {}
    normal = test[test["is_anomaly"] == 0]
    for label, rows in test[test["is_anomaly"] == 1].groupby("label"):
        per_defect[str(label)] = evaluate(pd.concat([normal, rows])["score"].to_numpy(),
                                          pd.concat([normal, rows])["is_anomaly"].to_numpy(), threshold)["recall"]
    metrics["recall_by_defect"] = per_defect
    write_json(layout.metrics, metrics)

    points = curves(values, labels)["roc"]
    with atomic_path(layout.roc_points) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fpr", "tpr"])
        writer.writerows(zip(points["fpr"], points["tpr"]))
    if layout.config.evaluate.plots:
        plot_all(values, labels, threshold, layout.plots, title=f"({layout.config.model.type})", unit=layout.unit)
    auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.4f}"
    print(f"evaluate: AUROC {auroc}, AP {metrics['average_precision'] or float('nan'):.4f}, "
          f"precision {metrics['precision']:.3f}, recall {metrics['recall'] or 0:.3f}, FPR {metrics['fpr'] or 0:.3f} "
          f"on {metrics['n']} test {layout.unit} ({metrics['n_anomalous']} anomalous)")
    return metrics
