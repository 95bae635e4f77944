"""Scores -> a decision threshold, on the calibration split.

``fpr`` is split-conformal: with n normal calibration scores, the threshold is the
k-th smallest, k = ceil((n + 1)(1 - alpha)). For a new normal image exchangeable with
them, P(score > threshold) <= (n + 1 - k) / (n + 1) <= alpha. That bound, not the
empirical FPR, is what we report as the guarantee. It needs no anomalies at all.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


class CalibrationError(ValueError):
    """Calibration is impossible with this data; the message says what is missing."""


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: str                  # the method actually used
    requested_method: str
    n_normal: int
    n_anomalous: int
    fpr_bound: float | None      # conformal bound on P(normal flagged); None when not applicable
    calibration_fpr: float       # empirical, on the calibration split
    calibration_recall: float | None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def non_finite_scores(scores: np.ndarray, names: list[str], what: str) -> str | None:
    """None when every score is a finite number; else what is wrong, naming the items.

    A score that is not a finite number (NaN, +-inf) is neither normal nor anomalous:
    compared with a threshold it reads as "not flagged", and dropped it hides a model that
    fails on some inputs. Calibration and evaluation refuse it instead."""
    bad = [name for name, ok in zip(names, np.isfinite(np.asarray(scores, dtype=np.float64))) if not ok]
    if not bad:
        return None
    return (f"{len(bad)} {what} have a score that is not a finite number (NaN or infinite), so the model cannot "
            f"be judged on them: {', '.join(bad[:10])}" + (", ..." if len(bad) > 10 else ""))


def conformal_threshold(normal_scores: np.ndarray, alpha: float) -> tuple[float, float]:
    """(threshold, bound) such that P(new normal score > threshold) <= bound <= alpha."""
    n = len(normal_scores)
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        need = math.ceil(1 / alpha) - 1
        raise CalibrationError(
            f"{n} normal calibration images cannot guarantee FPR <= {alpha}: at least {need} are needed")
    ordered = np.sort(normal_scores)
    return float(ordered[k - 1]), (n + 1 - k) / (n + 1)


def _f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold (flag = score > t) maximising F1; ties broken towards the higher threshold."""
    candidates = np.unique(scores)
    best_t, best_f1 = float(candidates[-1]), -1.0
    positives = labels.sum()
    for t in candidates[::-1]:
        flagged = scores > t
        tp = float((flagged & (labels == 1)).sum())
        fp = float((flagged & (labels == 0)).sum())
        f1 = 2 * tp / (2 * tp + fp + (positives - tp)) if positives else 0.0
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    # also consider flagging everything
    lowest = float(candidates[0]) - 1e-12 * max(1.0, abs(float(candidates[0])))
    tp, fp = float(positives), float((labels == 0).sum())
    if 2 * tp / (2 * tp + fp) > best_f1:
        best_t = lowest
    return best_t


def _recall_threshold(anomaly_scores: np.ndarray, target: float) -> float:
    """The highest threshold that still flags at least `target` of the anomalies."""
    ordered = np.sort(anomaly_scores)
    allowed_misses = math.floor(len(ordered) * (1 - target) + 1e-9)  # < len(ordered) since target > 0
    return float(np.nextafter(ordered[allowed_misses], -np.inf))


def calibrate(scores: np.ndarray, labels: np.ndarray, method: str, target_fpr: float = 0.05,
              target_recall: float = 0.95) -> Calibration:
    """Choose the threshold; images with score > threshold are anomalies.

    f1 and recall need labelled anomalies. When the calibration split has none,
    they fall back to fpr, and the returned ``note`` says so (a nightly batch
    without anomalies should still give a usable, guaranteed threshold).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(scores) != len(labels):
        raise CalibrationError("scores and labels differ in length")
    if not np.isfinite(scores).all():
        raise CalibrationError("calibration scores contain NaN or infinity")
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    if len(normal) == 0:
        raise CalibrationError("the calibration split has no normal images")
    used, note = method, ""
    if method in ("f1", "recall") and len(anomalous) == 0:
        used = "fpr"
        note = f"calibration split has no labelled anomalies: method '{method}' needs them, used 'fpr' instead"
    if used == "fpr":
        threshold, bound = conformal_threshold(normal, target_fpr)
    elif used == "f1":
        threshold, bound = _f1_threshold(scores, labels), None
    elif used == "recall":
        threshold, bound = _recall_threshold(anomalous, target_recall), None
    else:
        raise CalibrationError(f"unknown calibration method {method!r} (known: fpr, f1, recall)")
    return Calibration(
        threshold=float(threshold),
        method=used,
        requested_method=method,
        n_normal=int(len(normal)),
        n_anomalous=int(len(anomalous)),
        fpr_bound=bound,
        calibration_fpr=float((normal > threshold).mean()),
        calibration_recall=float((anomalous > threshold).mean()) if len(anomalous) else None,
        note=note,
    )
