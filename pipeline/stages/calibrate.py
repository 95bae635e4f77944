"""calibrate: choose the decision threshold on the calibration split's scores."""
from __future__ import annotations

import pandas as pd

from components.calibration import CalibrationError, calibrate
from pipeline.io import StageError, write_json
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    config = layout.config.calibration
    scores = pd.read_parquet(layout.scores)
    rows = scores[scores["split"] == "calibration"]
    try:
        result = calibrate(rows["score"].to_numpy(), rows["is_anomaly"].to_numpy(), config.method,
                           target_fpr=config.target_fpr, target_recall=config.target_recall)
    except CalibrationError as error:
        raise StageError(f"calibration: {error}") from None
    if result.note:
        print(f"calibrate: NOTE {result.note}")
    bound = f", FPR guarantee <= {result.fpr_bound:.4f}" if result.fpr_bound is not None else ""
    print(f"calibrate: method {result.method}, threshold {result.threshold:.6g}{bound} "
          f"({result.n_normal} normal, {result.n_anomalous} anomalous calibration {layout.unit})")
    write_json(layout.threshold, result.as_dict())
    return result.as_dict()
