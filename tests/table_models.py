"""A real served table model for tests that score records: a small deep_sad fitted on generated
transactions, its calibration normals' scores packed with it (so it gives p-values), logged and
registered to a local SQLite store as the pipeline logs it, and loaded as a pyfunc."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import yaml

PROJECT = Path(__file__).resolve().parents[1]


def declared_columns() -> dict:
    """params.yaml's table.columns: the schema of the generated transactions."""
    return yaml.safe_load((PROJECT / "params.yaml").read_text())["table"]["columns"]


def served_table_model(root: Path, name: str, rows: int, seed: int, width: int, epochs: int, calibration_rows: int,
                       threshold: Callable[[np.ndarray], float]):
    """The loaded pyfunc of a model registered as ``name`` under ``root``; its calibration
    normals (``calibration_rows`` fresh normal transactions, seed ``seed + 1``) are in
    ``root / "normals.npy"``; ``threshold`` picks its threshold from their sorted scores."""
    import mlflow
    import torch

    from components.tables import generate_transactions
    from components.training import TrainSettings, train
    from detector.scoring import score
    from detector.transform import Transform
    from pipeline.registry import Store, connect, ensure_experiment, log_detector

    frame = generate_transactions(rows, seed, fraud_rate=0.1)
    transform = Transform.fit(frame, declared_columns())
    spec = {"family": "deep_sad", "input": "table", "features": transform.width, "width": width, "latent_dim": 8}
    result = train(spec, transform.apply(frame), frame["is_fraud"].to_numpy(np.float32),
                   TrainSettings(epochs=epochs, batch_size=128, learning_rate=0.003, seed=0, device="cpu",
                                 num_threads=1), progress=False)
    calibration = generate_transactions(calibration_rows, seed + 1, fraud_rate=0.0)
    normals = np.sort(score(result.model.eval(), transform.apply(calibration), batch_size=4096, device="cpu"))
    np.save(root / "normals.npy", normals)
    torch.save(result.model.state_dict(), root / "model.pt")
    client = connect(Store(f"sqlite:///{root / 'mlflow.db'}"))
    experiment = ensure_experiment(client, name, (root / "artifacts").as_uri())  # not ./mlruns
    with mlflow.start_run(experiment_id=experiment):
        _, version = log_detector(root / "model.pt", {"spec": result.spec, "kind": "table",
                                                      "transform": transform.as_dict()}, threshold(normals),
                                  frame[list(declared_columns())].head(3), name, [], PROJECT / "detector",
                                  calibration_normals=root / "normals.npy")
    return mlflow.pyfunc.load_model(f"models:/{name}/{version}")
