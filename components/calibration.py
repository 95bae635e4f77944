"""Scores -> a decision threshold, on the calibration split.

``fpr`` is split-conformal: with n normal calibration scores, the threshold is the
k-th smallest, k = ceil((n + 1)(1 - alpha)). For a new normal image exchangeable with
them, P(score > threshold) <= (n + 1 - k) / (n + 1) <= alpha. That bound, not the
empirical FPR, is what we report as the guarantee. It needs no anomalies at all.

That bound holds on average over the draw of the calibration set: one unlucky draw can give
a threshold whose FPR is above alpha. With ``confidence`` (1 - delta) the threshold is the
k-th smallest for the smallest k with P(FPR <= alpha) >= 1 - delta over the draw, the
calibration-conditional guarantee (Vovk 2012; Bates et al. 2023): the FPR of a threshold at
the k-th of n normals is 1 - U_(k), U_(k) ~ Beta(k, n + 1 - k), so
P(FPR <= alpha) = P(Binomial(n, 1 - alpha) <= k - 1). It needs more normals: at least
log(delta) / log(1 - alpha) of them (59 for alpha = delta = 0.05).
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
    target_fpr: float | None = None      # alpha, for method fpr
    confidence: float | None = None      # 1 - delta of the calibration-conditional guarantee
    conditional_fpr_bound: float | None = None  # P(FPR <= this) >= confidence over calibration draws

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


def _binomial_cdf(j: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= j), summed in log space (n may be many thousands)."""
    if j < 0:
        return 0.0
    if j >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(j + 1, dtype=np.float64)
    log_comb = math.lgamma(n + 1) - np.array([math.lgamma(x + 1) + math.lgamma(n - x + 1) for x in i])
    terms = log_comb + i * math.log(p) + (n - i) * math.log1p(-p)
    top = terms.max()
    return float(min(1.0, math.exp(top) * np.exp(terms - top).sum()))


def conditional_rank(n: int, alpha: float, confidence: float) -> int:
    """The smallest k such that the k-th smallest of n normal scores, as threshold, has
    FPR <= alpha with probability >= confidence over the calibration draw.

    Raises CalibrationError, naming how many normals are needed, when even k = n is not enough."""
    needed = math.ceil(math.log(1 - confidence) / math.log(1 - alpha))
    if n < needed:
        raise CalibrationError(
            f"{n} normal calibration items cannot guarantee FPR <= {alpha} with confidence {confidence}: "
            f"at least {needed} are needed")
    low, high = 1, n  # P(Binomial(n, 1 - alpha) <= k - 1) grows with k; high satisfies it
    while low < high:
        middle = (low + high) // 2
        if _binomial_cdf(middle - 1, n, 1 - alpha) >= confidence:
            high = middle
        else:
            low = middle + 1
    return low


def conditional_bound(n: int, k: int, confidence: float) -> float:
    """The smallest a (to 1e-6) with P(FPR <= a) >= confidence for the k-th of n normals: the
    tightest FPR statement this threshold supports at that confidence (<= alpha by choice of k)."""
    low, high = 0.0, 1.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        if _binomial_cdf(k - 1, n, 1 - middle) >= confidence:
            high = middle
        else:
            low = middle
    return high


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
              target_recall: float = 0.95, confidence: float | None = None) -> Calibration:
    """Choose the threshold; images with score > threshold are anomalies.

    ``confidence`` (method fpr only): choose it so that FPR <= target_fpr holds with that
    probability over the calibration draw, not only on average (see the module docstring).

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
    conditional = None
    if method in ("f1", "recall") and len(anomalous) == 0:
        used = "fpr"
        note = f"calibration split has no labelled anomalies: method '{method}' needs them, used 'fpr' instead"
    if used == "fpr" and confidence is not None:
        k = conditional_rank(len(normal), target_fpr, confidence)
        threshold, bound = float(np.sort(normal)[k - 1]), (len(normal) + 1 - k) / (len(normal) + 1)
        conditional = conditional_bound(len(normal), k, confidence)
    elif used == "fpr":
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
        target_fpr=float(target_fpr) if used == "fpr" else None,
        confidence=confidence if conditional is not None else None,
        conditional_fpr_bound=conditional,
    )
