"""calibrate: choose the decision threshold on the calibration split's scores."""
from __future__ import annotations

import numpy as np
import pandas as pd

from components.calibration import CalibrationError, calibrate, non_finite_scores
from pipeline.io import StageError, atomic_path, write_json
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    config = layout.config.calibration
    scores = pd.read_parquet(layout.scores)
    rows = scores[scores["split"] == "calibration"]
    refused = non_finite_scores(rows["score"].to_numpy(), rows["path"].astype(str).tolist(),
                                f"calibration {layout.unit}")
    if refused:  # train refuses such scores before writing them: this guards a scores file from elsewhere
        raise StageError(f"calibration: {refused}")
    try:
        result = calibrate(rows["score"].to_numpy(), rows["is_anomaly"].to_numpy(), config.method,
                           target_fpr=config.target_fpr, target_recall=config.target_recall,
                           confidence=config.confidence)
    except CalibrationError as error:
        raise StageError(f"calibration: {error}") from None
    if result.note:
        print(f"calibrate: NOTE {result.note}")
    bound = f", FPR guarantee <= {result.fpr_bound:.4f}" if result.fpr_bound is not None else ""
    if result.conditional_fpr_bound is not None:
        bound += (f" on average; FPR <= {result.conditional_fpr_bound:.4f} with probability {result.confidence} "
                  f"for this calibration set")
    print(f"calibrate: method {result.method}, threshold {result.threshold:.6g}{bound} "
          f"({result.n_normal} normal, {result.n_anomalous} anomalous calibration {layout.unit})")
    normals = np.sort(rows.loc[rows["is_anomaly"] == 0, "score"].to_numpy(np.float64))
    with atomic_path(layout.calibration_normals) as tmp, open(tmp, "wb") as handle:
        np.save(handle, normals)  # the served model's p-values are ranks among these (detector/conformal.py)
    write_json(layout.threshold, result.as_dict())
    return result.as_dict()
