"""A version registered before the model package moved to detector/ still loads and scores in
this process: its packed entry file imports ``components.serving``, which is this repository's
``components`` here (already imported), so components/serving.py must keep that name working.
Without it, an upgraded deployment could neither re-score its champion (register's gate) nor
score with it (pipeline score, the scoring DAG)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT = Path(__file__).resolve().parents[2]
OLD_ENTRY = '''import mlflow.models

from components.serving import AnomalyDetector

mlflow.models.set_model(AnomalyDetector())
'''


def _png(size: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_model_registered_with_the_old_components_entry_loads_and_scores(tmp_path):
    import mlflow
    import torch

    import components.tables  # noqa: F401  (the repository's components, as in register or pipeline score)
    from detector.networks import build
    from pipeline.registry import Store, connect, ensure_experiment, log_detector

    old_code = tmp_path / "old" / "components"
    old_code.mkdir(parents=True)
    (old_code / "__init__.py").write_text("")
    (old_code / "serving_entry.py").write_text(OLD_ENTRY)
    spec = {"family": "autoencoder", "channels": 3, "image_size": 16, "width": 4, "latent_dim": 8}
    torch.manual_seed(0)
    torch.save(build(spec).state_dict(), tmp_path / "model.pt")
    client = connect(Store(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    experiment = ensure_experiment(client, "legacy", (tmp_path / "artifacts").as_uri())
    meta = {"spec": spec, "image_size": 16, "channels": 3}
    with mlflow.start_run(experiment_id=experiment):
        _, version = log_detector(tmp_path / "model.pt", meta, 0.5, pd.DataFrame({"image": [_png(16)]}), "legacy",
                                  [], old_code)
    model = mlflow.pyfunc.load_model(f"models:/legacy/{version}")
    out = model.predict(pd.DataFrame({"image": [_png(16), _png(24)]}))
    assert list(out.columns) == ["anomaly_score", "is_anomaly"]
    assert np.isfinite(out["anomaly_score"]).all() and len(out) == 2
