"""The champion is watched (pipeline/monitoring.py): each batch the scoring DAG scores is recorded
on the version's monitoring run in MLflow, a stream like the calibration normals does not set
the drift alarm off, a stream that changed does, once, with a line in runs/alerts.jsonl and a
tag on the version; a retried claim is not counted twice.

The champion is a real pyfunc (an untrained image autoencoder whose calibration normals are
its own scores of calm grey patches), registered in a SQLite store with the tags register
writes (method fpr and its bound); only the registry look-up of score.incoming is replaced."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import score
from pipeline.config import load
from pipeline.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]
NAME = "anomaly-detector"


def _calm(rng) -> np.ndarray:
    return rng.integers(100, 140, size=(32, 32, 3), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def watched(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    import torch

    from components.calibration import calibrate
    from detector.networks import build
    from detector.scoring import score as score_items
    from pipeline.registry import Store, connect, ensure_experiment, log_detector, tag_version

    rng = np.random.default_rng(0)
    spec = {"family": "autoencoder", "channels": 3, "image_size": 32, "width": 4, "latent_dim": 8}
    torch.manual_seed(0)
    network = build(spec).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    calm = np.stack([_calm(rng) for _ in range(400)])
    normals = np.sort(score_items(network, calm.transpose(0, 3, 1, 2), batch_size=64, device="cpu"))
    np.save(tmp_path / "normals.npy", normals)
    result = calibrate(normals, np.zeros(len(normals)), "fpr", target_fpr=0.05)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = connect(Store(store))
    experiment = ensure_experiment(client, "watched", (tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        _, version = log_detector(tmp_path / "model.pt", {"spec": spec, "image_size": 32, "channels": 3},
                                  result.threshold, pd.DataFrame({"image": [_png(calm[0])]}), NAME, [],
                                  PROJECT / "detector", calibration_normals=tmp_path / "normals.npy")
    tag_version(client, NAME, version, {"calibration_method": "fpr", "fpr_bound": result.fpr_bound})
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("ANOMALY_PIPELINE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(score, "_load", lambda *args, **kwargs: (model, f"models:/{NAME}@champion", version))
    return Layout(tmp_path / "project", load(PROJECT / "params.yaml")), client, version, rng


def _drop(layout: Layout, images: list[np.ndarray], night: int) -> None:
    layout.incoming.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        (layout.incoming / f"n{night}-{i:03d}.png").write_bytes(_png(pixels))


def _history(client, version: str, key: str) -> list[float]:
    from pipeline.monitoring import TAG

    [run] = client.search_runs([client.get_experiment_by_name("anomaly-detector-monitoring").experiment_id],
                               filter_string=f"tags.{TAG} = '{NAME}/{version}'")
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)], run


def test_a_calm_stream_is_recorded_and_does_not_fire_a_changed_one_does_once(watched):
    layout, client, version, rng = watched
    for night in range(4):  # 240 items like the calibration normals
        _drop(layout, [_calm(rng) for _ in range(60)], night)
        summary = score.incoming(layout, f"night-{night}")
        assert not summary["drift_alarm"]
    rates, run = _history(client, version, "flagged_rate")
    assert len(rates) == 4 and np.mean(rates) < 0.15
    assert len(_history(client, version, "p_value_median")[0]) == 4
    assert "monitor/history.png" in {a.path for a in client.list_artifacts(run.info.run_id, "monitor")}
    alerts = Path(layout.root).parent / "runs" / "alerts.jsonl"
    assert not alerts.exists()

    noisy = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(60)]  # the line changed
    _drop(layout, noisy, 9)
    summary = score.incoming(layout, "night-9")
    assert summary["drift_alarm"] and summary["monitor"][0]["fired_at"] <= 240 + 60
    [alert] = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert alert["version"] == version and alert["claim"] == "night-9"
    assert "fired at item" in client.get_model_version(NAME, version).tags["drift_alarm"]
    _drop(layout, noisy, 10)
    assert not score.incoming(layout, "night-10")["drift_alarm"]  # fired once; it stays fired, no second alert
    assert len(alerts.read_text().splitlines()) == 1


def test_a_retried_claim_is_counted_once(watched):
    from pipeline.monitoring import record_batch

    layout, client, version, rng = watched
    _drop(layout, [_calm(rng) for _ in range(30)], 0)
    score.incoming(layout, "night-0")
    table = __import__("pandas").read_csv(layout.score_results / "night-0.csv")
    again = record_batch(layout, version, table, "night-0")  # what a retry after a kill would do
    assert again["counted_before"]
    assert _history(client, version, "batch_items")[0] == [30.0]
