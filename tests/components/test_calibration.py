import numpy as np
import pytest

from components.calibration import CalibrationError, calibrate, conformal_threshold


def test_conformal_threshold_bounds_the_false_positive_rate_on_fresh_normals():
    """Over many draws, the FPR on new normal scores stays at or below alpha (the guarantee)."""
    rng = np.random.default_rng(0)
    alpha, rates = 0.1, []
    for _ in range(400):
        threshold, bound = conformal_threshold(rng.normal(size=49), alpha)
        assert bound <= alpha
        rates.append(float((rng.normal(size=2000) > threshold).mean()))
    assert np.mean(rates) <= alpha + 0.01
    assert np.mean(rates) > alpha - 0.05  # and it is not needlessly conservative


def test_too_few_normals_for_the_target_is_an_error_that_says_how_many():
    with pytest.raises(CalibrationError, match="at least 99"):
        conformal_threshold(np.arange(20.0), 0.01)


def test_fpr_works_without_any_anomalies():
    result = calibrate(np.linspace(0, 1, 100), np.zeros(100), "fpr", target_fpr=0.05)
    assert result.method == "fpr" and result.n_anomalous == 0
    assert result.calibration_fpr <= 0.05 and result.fpr_bound <= 0.05


@pytest.mark.parametrize("method", ["f1", "recall"])
def test_label_methods_fall_back_to_fpr_and_say_so(method):
    result = calibrate(np.linspace(0, 1, 100), np.zeros(100), method)
    assert result.method == "fpr" and result.requested_method == method
    assert "no labelled anomalies" in result.note


def test_f1_separates_separable_scores():
    scores = np.r_[np.linspace(0, 1, 50), np.linspace(2, 3, 10)]
    labels = np.r_[np.zeros(50), np.ones(10)]
    result = calibrate(scores, labels, "f1")
    assert 1 <= result.threshold < 2
    assert result.calibration_recall == 1.0 and result.calibration_fpr == 0.0


def test_recall_reaches_the_target_with_the_highest_threshold():
    anomalies = np.arange(1.0, 21.0)  # 20 anomalies
    scores = np.r_[np.zeros(30), anomalies]
    labels = np.r_[np.zeros(30), np.ones(20)]
    result = calibrate(scores, labels, "recall", target_recall=0.9)
    assert result.calibration_recall == pytest.approx(0.9)
    assert result.threshold < 3.0 and result.threshold >= 2.0


def test_nan_scores_are_refused():
    with pytest.raises(CalibrationError, match="NaN"):
        calibrate(np.array([0.1, np.nan]), np.array([0, 0]), "fpr")
