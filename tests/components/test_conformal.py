"""Conformal p-values, Benjamini-Hochberg and the calibration-conditional threshold, checked by
simulation against what each promises (seeded, so a run is repeatable; the Monte Carlo error
is stated where a rate is compared with its bound)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from components.calibration import CalibrationError, calibrate, conditional_rank
from detector.conformal import benjamini_hochberg, flagged_at, p_values
from detector.scoring import is_anomalous


@pytest.mark.parametrize("n", [19, 20, 59, 99, 100, 257])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2])
def test_flagging_p_at_most_alpha_is_the_fpr_threshold(n, alpha):
    rng = np.random.default_rng(n)
    normals = rng.integers(0, 30, size=n).astype(float)  # ties on purpose
    new = np.concatenate([rng.integers(-5, 40, size=500).astype(float), normals, [np.nan, np.inf, -np.inf]])
    try:
        result = calibrate(normals, np.zeros(n), "fpr", target_fpr=alpha)
    except CalibrationError:
        assert math.ceil((n + 1) * (1 - alpha)) > n
        return
    by_threshold = is_anomalous(new, result.threshold)  # score > threshold, or not a finite number
    by_p = flagged_at(p_values(new, normals), alpha, n)
    np.testing.assert_array_equal(by_p, by_threshold)


def test_p_values_are_valid_for_normals_and_small_for_outliers():
    rng = np.random.default_rng(0)
    draws, n, below = 400, 50, {0.05: 0, 0.1: 0, 0.2: 0}
    for _ in range(draws):
        p = p_values(rng.normal(size=20), rng.normal(size=n))
        for a in below:
            below[a] += int((p <= a).sum())
    for a, count in below.items():
        rate = count / (draws * 20)
        assert rate <= a + 3 * math.sqrt(a * (1 - a) / draws), (a, rate)  # P(p <= a) <= a
    outlier = p_values(np.array([10.0]), rng.normal(size=n))
    assert outlier[0] == pytest.approx(1 / (n + 1))


def test_p_values_refuse_an_unusable_calibration_set():
    with pytest.raises(ValueError, match="at least one"):
        p_values(np.array([1.0]), np.array([]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        p_values(np.array([1.0]), np.array([0.0, np.nan]))


def test_benjamini_hochberg_controls_the_false_discovery_proportion():
    """Batches of 200 items, 10% anomalies shifted by 3 sd; FDP averaged over 300 batches."""
    rng = np.random.default_rng(1)
    q, fdps, found = 0.1, [], []
    for _ in range(300):
        calibration = rng.normal(size=300)
        is_anomaly = rng.random(200) < 0.1
        scores = rng.normal(size=200) + 3.0 * is_anomaly
        flags = benjamini_hochberg(p_values(scores, calibration), q)
        fdps.append((flags & ~is_anomaly).sum() / max(1, flags.sum()))
        found.append((flags & is_anomaly).sum() / max(1, is_anomaly.sum()))
    assert np.mean(fdps) <= q + 3 * np.std(fdps) / math.sqrt(len(fdps)), np.mean(fdps)
    assert np.mean(found) > 0.3  # it still finds anomalies: flagging nothing would pass the first check


def test_benjamini_hochberg_rule():
    p = np.array([0.01, 0.04, 0.03, 0.5, 0.02])
    # sorted 0.01 0.02 0.03 0.04 0.5 against k q / m = 0.01 0.02 0.03 0.04 0.05: the first four pass
    np.testing.assert_array_equal(benjamini_hochberg(p, 0.05), [True, True, True, False, True])
    assert not benjamini_hochberg(np.array([0.2, 0.9]), 0.05).any()
    with pytest.raises(ValueError, match="NaN"):
        benjamini_hochberg(np.array([0.01, np.nan]), 0.1)


@pytest.mark.parametrize("alpha,confidence,n", [(0.05, 0.95, 200), (0.1, 0.9, 80)])
def test_calibration_conditional_threshold_covers(alpha, confidence, n):
    """Normals uniform on (0, 1): a threshold t has FPR exactly 1 - t, so each draw's FPR is
    known. Over 2,000 calibration draws the share with FPR <= alpha must reach the confidence
    (less 3 Monte Carlo standard errors); the plain conformal threshold, which only holds on
    average, must fall short of it, or this test could not tell them apart."""
    rng = np.random.default_rng(2)
    draws = 2000
    conditional, marginal = 0, 0
    for _ in range(draws):
        normals = rng.random(n)
        labels = np.zeros(n)
        conditional += (1 - calibrate(normals, labels, "fpr", alpha, confidence=confidence).threshold) <= alpha
        marginal += (1 - calibrate(normals, labels, "fpr", alpha).threshold) <= alpha
    slack = 3 * math.sqrt(confidence * (1 - confidence) / draws)
    assert conditional / draws >= confidence - slack, conditional / draws
    assert marginal / draws < confidence - slack, marginal / draws


def test_calibration_conditional_refuses_too_few_normals_and_says_how_many():
    with pytest.raises(CalibrationError, match="at least 59 are needed"):
        calibrate(np.linspace(0, 1, 58), np.zeros(58), "fpr", 0.05, confidence=0.95)
    result = calibrate(np.linspace(0, 1, 59), np.zeros(59), "fpr", 0.05, confidence=0.95)
    assert result.confidence == 0.95 and result.conditional_fpr_bound <= 0.05
    assert conditional_rank(59, 0.05, 0.95) == 59
