"""The served model's p_value: the conformal p-value of each score among the normal calibration
scores packed in the model, so that at method fpr ``is_anomaly`` is exactly ``p_value <= bound``
(the calibration's fpr_bound, at most target_fpr), whatever the input."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[2]


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_served_model_returns_p_values_that_agree_with_its_flags(tmp_path):
    import mlflow
    import torch

    from components.calibration import calibrate
    from detector.conformal import flagged_at
    from detector.networks import build
    from detector.scoring import score
    from pipeline.registry import Store, connect, ensure_experiment, log_detector

    rng = np.random.default_rng(0)
    spec = {"family": "autoencoder", "channels": 3, "image_size": 16, "width": 4, "latent_dim": 8}
    torch.manual_seed(0)
    network = build(spec).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    normal = rng.integers(100, 140, size=(60, 16, 16, 3), dtype=np.uint8)  # calm grey patches
    normals = np.sort(score(network, normal.transpose(0, 3, 1, 2), batch_size=32, device="cpu"))
    np.save(tmp_path / "normals.npy", normals)
    result = calibrate(normals, np.zeros(len(normals)), "fpr", target_fpr=0.1)

    client = connect(Store(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    experiment = ensure_experiment(client, "p-values", (tmp_path / "artifacts").as_uri())
    meta = {"spec": spec, "image_size": 16, "channels": 3, "kind": "image"}
    with mlflow.start_run(experiment_id=experiment):
        _, version = log_detector(tmp_path / "model.pt", meta, result.threshold, pd.DataFrame({"image": [
            _png(normal[0])]}), "p-values", [], PROJECT / "detector", calibration_normals=tmp_path / "normals.npy")
    model = mlflow.pyfunc.load_model(f"models:/p-values/{version}")
    new = [rng.integers(100, 140, size=(16, 16, 3), dtype=np.uint8) for _ in range(40)] + \
          [rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8) for _ in range(10)]  # noisy: anomalous
    out = model.predict(pd.DataFrame({"image": [_png(x) for x in new]}))
    assert list(out.columns) == ["anomaly_score", "is_anomaly", "p_value"]
    p = out["p_value"].to_numpy()
    assert ((p > 0) & (p <= 1)).all()
    np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), flagged_at(p, result.fpr_bound, len(normals)))
    assert out["is_anomaly"].iloc[40:].all() and (p[40:] == 1 / (len(normals) + 1)).all()
    assert not out["is_anomaly"].iloc[:40].all()  # the test can tell flagged from not flagged
