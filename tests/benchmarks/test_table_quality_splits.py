"""The table quality benchmark's data, splits and baselines: no training, a few seconds."""
from __future__ import annotations

import numpy as np

from benchmarks import table_quality as tq


def _config():
    from pipeline.config import load

    return load(tq.ROOT / "params.yaml")


def test_default_table_is_generate_datas_first_batch():
    from pipeline.cli import _parser

    args = _parser().parse_args(["generate-data"])
    assert (args.rows, args.fraud_rate) == (tq.DEFAULT_ROWS, tq.DEFAULT_FRAUD_RATE)
    config = _config()
    frame = tq.default_frame(config)
    assert len(frame) == tq.DEFAULT_ROWS and frame[config.table.label_column].sum() == 200
    assert frame[config.table.key_column].iloc[0] == f"{tq.DEFAULT_BATCH}-0000000"


def test_default_split_follows_the_pipeline_rule():
    from components.splits import split_of
    from components.tables import key_hash

    config = _config()
    s = config.preprocess.split
    parts = tq.default_splits(config, tq.default_frame(config, rows=600))
    assert sum(len(p) for p in parts.values()) == 600
    for name, rows in parts.items():
        assert all(split_of(key_hash(k), (s.train, s.calibration, s.test)) == name
                   for k in rows[config.table.key_column])
    split = tq.default_split(config, rows=600)
    assert split.train_x.dtype == np.float32 and split.train_x.shape == (len(parts["train"]), 19)
    assert len(split.test_y) == len(parts["test"]) and split.train_y.sum() > 0  # training keeps its anomalies
    assert np.isfinite(split.train_x).all() and np.isfinite(split.test_x).all()  # missing distances imputed


def test_cancer_rows_hold_a_tenth_of_labelled_malignant_and_a_natural_test_split():
    features, anomaly = tq.cancer_data()
    assert features.shape == (569, 30) and anomaly.sum() == 212
    for seed in (0, 3):
        rows = tq.cancer_rows(anomaly, seed)
        assert not set(rows["train"]) & set(rows["test"])
        assert abs(anomaly[rows["train"]].mean() - tq.LABELLED_FRACTION) < 0.01
        assert abs(anomaly[rows["test"]].mean() - anomaly.mean()) < 0.01  # stratified, natural ratio
        again = tq.cancer_rows(anomaly, seed)
        assert all(np.array_equal(rows[k], again[k]) for k in rows)
    split = tq.cancer_split(0)
    assert split.train_x.shape[1] == 30 and abs(float(split.train_x[:, 0].mean())) < 1e-5  # standardised on train


def test_baselines_rank_an_obvious_outlier_first():
    rng = np.random.default_rng(0)
    normal = rng.normal(0, 1, (80, 5)).astype(np.float32)
    odd = np.full((4, 5), 8.0, np.float32)
    split = tq.TableSplit(train_x=np.concatenate([normal[:60], odd[:1]]), train_y=np.r_[np.zeros(60), 1.0].astype(
        np.float32), test_x=np.concatenate([normal[60:], odd]), test_y=np.r_[np.zeros(20), np.ones(4)].astype(np.float32))
    for name, scores in tq.baseline_scores(split, seed=0).items():
        assert scores[-4:].min() > scores[:20].max(), name
