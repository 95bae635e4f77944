"""The calibrate stage with ``calibration.confidence``: threshold.json states alpha, the
confidence, n and the bound; too few normal calibration items are refused with how many are
needed; the sorted normal scores the served model's p-values rank against are written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]


def _layout(root: Path, confidence):
    from pipeline.config import parse
    from pipeline.layout import Layout

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["calibration"].update(method="fpr", target_fpr=0.05, confidence=confidence)
    return Layout(root, parse(raw))


def _scores(layout, n_normal: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    normal = rng.random(n_normal)
    rows = [{"path": f"n{i}", "split": "calibration", "row": i, "label": "good", "is_anomaly": 0, "score": s,
             "batch": "b"} for i, s in enumerate(normal)]
    rows += [{"path": f"a{i}", "split": "calibration", "row": n_normal + i, "label": "scratch", "is_anomaly": 1,
              "score": 2.0 + i, "batch": "b"} for i in range(5)]
    layout.scores.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(layout.scores, index=False)
    return normal


def test_a_confident_threshold_states_its_guarantee_and_keeps_the_normals(tmp_path):
    from pipeline.io import read_json
    from pipeline.stages import calibrate

    layout = _layout(tmp_path, 0.95)
    normal = _scores(layout, 200)
    calibrate.run(layout)
    written = read_json(layout.threshold)
    assert written["target_fpr"] == 0.05 and written["confidence"] == 0.95 and written["n_normal"] == 200
    assert written["conditional_fpr_bound"] <= 0.05
    plain = _layout(tmp_path / "plain", None)
    _scores(plain, 200)
    calibrate.run(plain)
    assert written["threshold"] > read_json(plain.threshold)["threshold"]  # stricter than the average-case one
    np.testing.assert_array_equal(np.load(layout.calibration_normals), np.sort(normal))


def test_too_few_normals_for_the_confidence_are_refused_with_how_many_are_needed(tmp_path):
    from pipeline.io import StageError
    from pipeline.stages import calibrate

    layout = _layout(tmp_path, 0.95)
    _scores(layout, 40)
    with pytest.raises(StageError, match="40 normal calibration items .* at least 59 are needed"):
        calibrate.run(layout)
    assert not layout.threshold.exists() and not layout.calibration_normals.exists()


@pytest.mark.parametrize("items_key", ["train_items", "train_images"])  # train.json before 2026-12-05 said images
def test_the_run_summary_states_the_calibration_conditional_guarantee(tmp_path, capsys, items_key):
    from pipeline.io import read_json
    from pipeline.run_record import print_summary
    from pipeline.stages import calibrate

    layout = _layout(tmp_path, 0.95)
    _scores(layout, 200)
    calibrate.run(layout)
    summary = {"status": "finished", "run_id": "r1", "version": "3", "seconds": 1.0, "validation": {},
               "train": {"family": "deep_sad", "device": "cpu", "epochs": 1, items_key: 10, "seconds": 0.5},
               "calibration": read_json(layout.threshold),
               "metrics": {k: 0.5 for k in ("auroc", "average_precision", "precision", "recall", "f1", "fpr")}
               | {"n": 10, "n_anomalous": 2}, "promotion": {"promoted": True, "champion": "3"}}
    print_summary(layout, summary)
    bound = read_json(layout.threshold)["conditional_fpr_bound"]
    out = capsys.readouterr().out
    assert "1 epochs, 10 " in out
    assert f"FPR <= {bound:.4f} with probability 0.95 for this calibration set of 200 normals" in out
