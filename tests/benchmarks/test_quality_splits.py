"""The quality benchmark's splits and baselines: no training, a few seconds."""
from __future__ import annotations

import numpy as np

from benchmarks import quality


def test_digits_partition_is_disjoint_stratified_and_seeded():
    images, targets = quality.digits_images()
    assert images.dtype == np.uint8 and images.shape[1:] == (1, 8, 8) and images.max() == 255
    parts = quality.digits_partition(targets)
    together = np.concatenate(list(parts.values()))
    assert len(together) == len(targets) == len(np.unique(together))
    for name, share in (("train", 0.6), ("calibration", 0.2), ("test", 0.2)):
        assert abs(len(parts[name]) / len(targets) - share) < 0.01
        counts = np.bincount(targets[parts[name]], minlength=10) / len(parts[name])
        assert np.allclose(counts, np.bincount(targets) / len(targets), atol=0.01)  # stratified by digit
    again = quality.digits_partition(targets)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)


def test_digits_training_rows_hold_every_normal_row_and_a_tenth_of_labelled_anomalies():
    images, targets = quality.digits_images()
    parts = quality.digits_partition(targets)
    for digit in (0, 7):
        rows = quality.digits_training_rows(targets, parts["train"], digit)
        assert set(rows) <= set(parts["train"])
        normal = parts["train"][targets[parts["train"]] == digit]
        assert set(normal) <= set(rows)
        share = float(np.mean(targets[rows] != digit))
        assert abs(share - quality.LABELLED_FRACTION) < 0.01
        split = quality.digits_split(images, targets, parts, digit)
        assert len(split.test_y) == len(parts["test"]) and split.test_y.sum() == np.sum(targets[parts["test"]] != digit)


def test_default_split_follows_the_pipeline_rule(tmp_path):
    from components.images import content_hash, discover
    from components.splits import split_of
    from pipeline.config import load

    config = load(quality.ROOT / "params.yaml")
    split, counts = quality.default_split(True, config, tmp_path, seed=43)
    fractions = (config.preprocess.split.train, config.preprocess.split.calibration, config.preprocess.split.test)
    expected = {"train": 0, "calibration": 0, "test": 0}
    for file in discover(tmp_path / "landing-43"):
        expected[split_of(content_hash(file.path.read_bytes()), fractions)] += 1
    assert {k: n for k, (n, _) in counts.items()} == expected
    size, channels = config.preprocess.image_size, config.preprocess.channels
    assert split.train_x.shape == (expected["train"], channels, size, size) and split.train_x.dtype == np.uint8
    assert len(split.test_x) == expected["test"] and 0 < split.test_y.sum() < len(split.test_y)


def test_baselines_rank_an_obvious_outlier_first():
    rng = np.random.default_rng(0)
    normal = (rng.normal(100, 5, (80, 1, 8, 8))).clip(0, 255).astype(np.uint8)
    odd = np.full((4, 1, 8, 8), 250, np.uint8)
    split = quality.Split(train_x=normal[:60], train_y=np.zeros(60, np.float32),
                          test_x=np.concatenate([normal[60:], odd]),
                          test_y=np.r_[np.zeros(20), np.ones(4)].astype(np.float32))
    pca, components = quality.pca_scores(split)
    assert 1 <= components <= 64 and pca[-4:].min() > pca[:20].max()
    forest = quality.isolation_forest_scores(split, seed=0)
    assert forest[-4:].min() > forest[:20].max()
