"""validate's drift test for images (validate.drift): the newest batch's normal images against the
earlier batches', in feature space. Batches from one distribution pass; a batch under new lighting
is found, reported, and with ``refuse`` refused; a check that computes no number is an error."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components.synthetic import BatchSpec, write_batch
from pipeline.config import parse
from pipeline.layout import Layout
from tests.scratch import deep_update

PROJECT = Path(__file__).resolve().parents[2]
SPEC = BatchSpec(n_good=40, n_per_defect=2, size=64)
GAIN = 1.15  # new lighting, 15 % brighter: ImageNet features alone missed it (components/image_features.py)


def _layout(root: Path, **validate) -> Layout:
    """The project's params (PatchCore on EfficientNet-Lite0's packaged weights: the drift test
    embeds with that backbone) with this test's validate settings."""
    params = deep_update(yaml.safe_load((PROJECT / "params.yaml").read_text()),
                         {"validate": {"min_good": 10, "min_anomalies": 2, **validate}})
    return Layout(root, parse(params))


def _relight(batch: Path, gain: float) -> None:
    """New lighting on the line: every normal image of the batch ``gain`` times brighter."""
    for path in sorted((batch / "good").glob("*.png")):
        pixels = np.asarray(Image.open(path), dtype=np.float64) * gain
        Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8)).save(path)


def _snapshot(layout: Layout, gain: float | None = None, batches: int = 2) -> None:
    for number in range(1, batches + 1):
        write_batch(layout.raw, f"batch-{number:04d}", seed=number, spec=SPEC)
    if gain is not None:
        _relight(layout.raw / f"batch-{batches:04d}", gain)


def _drift(layout: Layout) -> dict | None:
    """The drift check alone, on the manifest validate builds (without the GX suite)."""
    from components.images import discover
    from components.validation import build_manifest
    from pipeline.kinds.image import _drift, decode_limits

    config = layout.config
    manifest = build_manifest(discover(layout.raw, config.data.extensions), config.preprocess.split.fractions,
                              decode_limits(config))
    return _drift(layout, manifest)


def test_batches_from_one_distribution_are_not_flagged(tmp_path):
    layout = _layout(tmp_path)
    _snapshot(layout)
    drift = _drift(layout)
    assert drift["tested"] and not drift["drifted"] and not drift["refused"]
    assert drift["p_value"] > 0.01 and (drift["n_before"], drift["n_now"]) == (40, 40)
    assert drift["newest_batch"] == "batch-0002" and drift["earlier_batches"] == 1
    assert "efficientnet_lite0" in drift["embedding"]  # the model's backbone, from its package
    assert drift["message"].startswith("batch batch-0002: no drift found (MMD p = ")


def test_new_lighting_is_flagged_and_warn_goes_on_with_it_in_the_report(tmp_path, capsys):
    from pipeline.stages import validate

    layout = _layout(tmp_path, drift="warn")
    _snapshot(layout, gain=GAIN)
    summary = validate.run(layout)
    drift = summary["drift"]
    assert summary["success"] and drift["drifted"] and not drift["refused"]
    assert drift["p_value"] <= 0.01 and drift["statistic"] > 0 and drift["permutations"] == 499
    assert json.loads(layout.validation_summary.read_text())["drift"] == drift
    assert "WARNING: batch batch-0002's normal images differ" in drift["message"]
    assert drift["message"] in capsys.readouterr().out
    assert html.escape(drift["message"]) in layout.validation_html.read_text()
    assert layout.manifest.is_file()


def test_refuse_fails_validate_as_refused_data_naming_the_p_value(tmp_path):
    from pipeline.io import DataError
    from pipeline.stages import validate

    layout = _layout(tmp_path, drift="refuse")
    _snapshot(layout, gain=GAIN)
    with pytest.raises(DataError, match=r"batch batch-0002's normal images differ .*MMD p = 0\.00\d+ <= "
                                        r"validate.drift_level 0\.01.*validate\.drift: warn") as refused:
        validate.run(layout)
    summary = json.loads(layout.validation_summary.read_text())
    assert not summary["success"] and summary["drift"]["refused"]
    assert f"MMD p = {summary['drift']['p_value']:.3g}" in str(refused.value)
    assert [f["expectation"] for f in summary["failures"]] == ["image_drift"]
    assert not layout.manifest.exists()  # nothing for preprocess to read


def test_a_snapshot_the_suite_refuses_is_not_compared(tmp_path):
    from pipeline.io import DataError
    from pipeline.stages import validate

    layout = _layout(tmp_path, drift="refuse", min_good=1000)
    _snapshot(layout, gain=GAIN)
    with pytest.raises(DataError, match="at least 1000") as refused:
        validate.run(layout)
    assert "MMD" not in str(refused.value)
    assert "drift" not in json.loads(layout.validation_summary.read_text())


def test_the_run_summary_prints_the_drift_line(tmp_path, capsys):
    from pipeline.run_record import print_summary

    layout = _layout(tmp_path)
    drift = {"setting": "warn", "tested": True, "refused": False, "message": "WARNING: batch b2's normal images"}
    print_summary(layout, {"status": "failed", "message": "m", "run_id": "r1",
                           "validation": {"success": True, "n_files": 3, "label_counts": {}, "failures": [],
                                          "drift": drift}})
    assert "drift        WARNING: batch b2's normal images" in capsys.readouterr().out


def test_one_batch_is_not_tested_and_off_tests_nothing(tmp_path):
    layout = _layout(tmp_path / "one")
    _snapshot(layout, batches=1)
    assert _drift(layout) == {"setting": "warn", "tested": False, "refused": False,
                              "message": "no earlier batch: drift not tested"}
    off = _layout(tmp_path / "two", **yaml.safe_load("drift: off"))  # YAML's false: params.yaml's bare word
    _snapshot(off, gain=GAIN)
    assert _drift(off) is None


def test_without_backbone_weights_the_pixel_embedding_still_finds_new_lighting(tmp_path, monkeypatch):
    import detector.backbones

    monkeypatch.setattr(detector.backbones, "packaged_weights", lambda backbone: None)
    layout = _layout(tmp_path, drift="refuse")
    _snapshot(layout, gain=GAIN)
    drift = _drift(layout)
    assert drift["embedding"].startswith("8x8 thumbnail") and "efficientnet" not in drift["embedding"]
    assert drift["refused"] and drift["p_value"] <= 0.01


def test_a_statistic_that_is_not_a_number_is_an_error_not_no_drift(tmp_path, monkeypatch):
    import components.image_features
    from pipeline.io import DataError, StageError

    monkeypatch.setattr(components.image_features, "embed_pair",
                        lambda before, now, space: (np.full((len(before), 4), np.nan), np.zeros((len(now), 4))))
    layout = _layout(tmp_path)
    _snapshot(layout)
    with pytest.raises(StageError, match="gave no number .*NaN.* not 'no drift'") as error:
        _drift(layout)
    assert not isinstance(error.value, DataError)  # a fault of the check: retried, not blamed on the data
