"""evaluate: metrics at the threshold on the test split, ROC/PR/histogram plots."""
from __future__ import annotations

import csv

import pandas as pd

from components.calibration import non_finite_scores
from components.metrics import curves, evaluate, plot_all
from pipeline.io import StageError, atomic_path, read_json, write_json
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    scores = pd.read_parquet(layout.scores)
    test = scores[scores["split"] == "test"]
    refused = non_finite_scores(test["score"].to_numpy(), test["path"].astype(str).tolist(), f"test {layout.unit}")
    if refused:  # compared with the threshold they would count as normal; dropped, as never seen
        raise StageError(f"evaluate: {refused}")
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
        if "anomaly_map" in test.columns:
            _overlays(layout, test, threshold)
    auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.4f}"
    print(f"evaluate: AUROC {auroc}, AP {metrics['average_precision'] or float('nan'):.4f}, "
          f"precision {metrics['precision']:.3f}, recall {metrics['recall'] or 0:.3f}, FPR {metrics['fpr'] or 0:.3f} "
          f"on {metrics['n']} test {layout.unit} ({metrics['n_anomalous']} anomalous)")
    return metrics


def _upsample(values, side: int):
    """A stored map back at the image's size (bilinear), for the overlay."""
    import numpy as np
    from PIL import Image

    if values.shape[0] == side:
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR))


OVERLAYS_EACH = 3   # worst false positives, worst false negatives, best detections per defect kind


def _overlays(layout: Layout, test: pd.DataFrame, threshold: float) -> None:
    """Where the model looked (patchcore, padim): the image and its anomaly map, for the
    normal images it scored highest (false alarms first), the anomalies it scored lowest
    (misses first), and the clearest detections of each defect kind, as
    ``plots/maps/<kind>-<n>-<label>.png``. The maps come from train's scores.parquet."""
    import numpy as np

    from components.heatmaps import overlay

    folder = layout.plots / "maps"
    folder.mkdir(parents=True, exist_ok=True)
    images = np.load(layout.split_items("test"), mmap_mode="r")
    side = images.shape[-1]
    normal, anomalous = test[test["is_anomaly"] == 0], test[test["is_anomaly"] == 1]
    chosen = [("false_positive" if r.score > threshold else "normal_highest", r)
              for r in normal.nlargest(OVERLAYS_EACH, "score").itertuples()]
    chosen += [("false_negative" if r.score <= threshold else "detected_lowest", r)
               for r in anomalous.nsmallest(OVERLAYS_EACH, "score").itertuples()]
    for _, rows in anomalous.groupby("label"):
        chosen += [("detected", r) for r in rows.nlargest(OVERLAYS_EACH, "score").itertuples() if r.score > threshold]
    for n, (kind, r) in enumerate(chosen):
        stored = np.frombuffer(r.anomaly_map, dtype=np.float16).astype(np.float32)
        small = int(round(len(stored) ** 0.5))  # train stores them at most 64 x 64
        anomaly_map = _upsample(stored.reshape(small, small), side)
        title = f"{kind.replace('_', ' ')}: {r.label}, score {r.score:.4g} (threshold {threshold:.4g})"
        overlay(np.asarray(images[int(r.row)]), anomaly_map, threshold, title,
                folder / f"{kind}-{n:02d}-{r.label}.png")

