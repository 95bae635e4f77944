"""score.fdr: Benjamini-Hochberg over a batch's p-values. Simulated on batches from the table
generator scored by a served model (as ``pipeline score`` scores them): the false-discovery
proportion among the items ``is_anomaly_fdr`` flags averages at most q; with it off the output
is what it was, item for item.

BH's guarantee, like the conformal FPR's, is an average over the calibration draw as well as
the batches (Bates et al. 2023): one fixed calibration set of 2,000 normals gave a mean FDP of
0.116 at q = 0.1 over 40 batches (se 0.008), within its own noise of q but not what the theorem states.
So each simulated night gets its own calibration draw (its p-values ranked among a fresh set
of normals' scores from the same model), as a new model each night does."""
from __future__ import annotations

import copy
import math
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.table_models import PROJECT, declared_columns, served_table_model

KEY = "transaction_id"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A deep_sad table model fitted on generated transactions, calibrated at fpr on a fresh
    set of generated normals, logged with those normals and loaded as a pyfunc."""
    from components.calibration import calibrate

    root = tmp_path_factory.mktemp("fdr")
    model = served_table_model(root, "fdr", rows=1500, seed=21, width=16, epochs=5, calibration_rows=2000,
                               threshold=lambda normals: calibrate(normals, np.zeros(len(normals)), "fpr",
                                                                   target_fpr=0.05).threshold)
    return model, root


def _batch(model, root: Path, seed: int, q):
    from components.tables import generate_transactions
    from detector.conformal import p_values
    from pipeline.score import score_table_files, with_fdr

    rows = generate_transactions(400, 100 + seed, batch=f"night-{seed}", fraud_rate=0.1)
    folder = root / f"night-{seed}"
    folder.mkdir(exist_ok=True)
    rows.to_csv(folder / "batch.csv", index=False)
    table = score_table_files(model, [folder / "batch.csv"], folder, KEY, ("merchant_category", "channel"))
    packed = np.load(root / "normals.npy")
    np.testing.assert_allclose(table["p_value"], p_values(table["anomaly_score"].to_numpy(), packed))
    calibration = generate_transactions(1000, 500 + seed, batch=f"calibration-{seed}", fraud_rate=0.0)
    fresh = model.predict(calibration[list(declared_columns())])["anomaly_score"].to_numpy()
    table["p_value"] = p_values(table["anomaly_score"].to_numpy(), fresh)  # this night's calibration draw
    truth = dict(zip(rows[KEY].astype(str), rows["is_fraud"].astype(bool)))
    return with_fdr(table, q), np.array([truth[r] for r in table["row"]])


def test_the_false_discovery_proportion_averages_at_most_q(served):
    model, root = served
    q, fdps, recalls = 0.1, [], []
    for seed in range(100):
        table, fraud = _batch(model, root, seed, q)
        flags = table["is_anomaly_fdr"].to_numpy(bool)
        fdps.append((flags & ~fraud).sum() / max(1, flags.sum()))
        recalls.append((flags & fraud).sum() / fraud.sum())
    mean, error = float(np.mean(fdps)), float(np.std(fdps)) / math.sqrt(len(fdps))
    print(f"FDR q={q}: mean false-discovery proportion {mean:.4f} (se {error:.4f}) over {len(fdps)} batches, "
          f"mean recall {np.mean(recalls):.3f}")
    assert mean <= q + 3 * error, (mean, error)
    assert np.mean(recalls) > 0.2, np.mean(recalls)  # it flags fraud: flagging nothing would pass the first check


def test_with_fdr_off_the_flags_are_unchanged_and_no_column_is_added(served):
    model, root = served
    off, _ = _batch(model, root, 99, None)
    on, _ = _batch(model, root, 99, 0.1)
    assert "is_anomaly_fdr" not in off and "is_anomaly_fdr" in on
    assert off["is_anomaly"].tolist() == on["is_anomaly"].tolist()
    assert ((off["p_value"] > 0) & (off["p_value"] <= 1)).all()


def test_fdr_with_a_champion_that_gives_no_p_values_is_refused_by_name(served, tmp_path):
    from pipeline.config import parse
    from pipeline.io import StageError
    from pipeline.layout import Layout
    from pipeline.score import check_fdr

    model, _ = served
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    raw["score"]["fdr"] = 0.1
    layout = Layout(tmp_path, parse(raw))
    check_fdr(layout, model, "1")  # it carries its normals: accepted
    detector = copy.copy(model.unwrap_python_model())
    detector.normals = None  # what load_context leaves for a model registered before p-values
    old = types.SimpleNamespace(unwrap_python_model=lambda: detector)
    with pytest.raises(StageError, match="score.fdr is 0.1 but the model \\(v7\\) gives no p_value"):
        check_fdr(layout, old, "7")
