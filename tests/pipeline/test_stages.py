"""Stages called in-process on a scratch workspace: determinism of the whole
train -> calibrate -> evaluate chain, and refusals that happen before any work."""
from __future__ import annotations

import json

import pytest

from conftest import make_workspace, run_cli
from pipeline.config import load
from pipeline.layout import Layout


@pytest.mark.slow
def test_same_params_and_data_give_identical_metrics_twice(tmp_path):
    from pipeline.stages import calibrate, evaluate, ingest, preprocess, train, validate

    ws = make_workspace(tmp_path / "ws")
    layout = Layout(ws, load(ws / "params.yaml"))
    ingest.run(layout)
    validate.run(layout)
    preprocess.run(layout)
    runs = []
    for _ in range(2):
        for path in layout.checkpoints.glob("*.pt"):
            path.unlink()  # a fresh training, not a resume
        train.run(layout)
        calibrate.run(layout)
        evaluate.run(layout)
        runs.append((json.loads(layout.metrics.read_text()), layout.weights.read_bytes()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][0]["auroc"] is not None


@pytest.mark.slow
def test_invalid_params_are_refused_before_any_work(tmp_path):
    ws = make_workspace(tmp_path / "ws", {"model": {"type": "transformer"}})
    result = run_cli(ws, "run", check=False)
    assert result.returncode == 2
    assert "model.type" in result.stderr
    assert not (ws / "mlflow.db").exists() and not (ws / "data" / "raw").exists()
