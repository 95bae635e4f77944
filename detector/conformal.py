"""Conformal p-values and the Benjamini-Hochberg procedure.

Here, not in components/, because the served model computes them: it carries the normal
calibration scores it was calibrated on (sorted, in its spec) and turns each new score into

    p = (1 + #{calibration normals scoring >= s}) / (n + 1),

the conformal p-value of Bates, Candes, Lei, Romano and Sesia ("Testing for outliers with
conformal p-values", Ann. Statist. 2023). For a new normal item exchangeable with the
calibration normals, P(p <= a) <= a for every a: a small p-value means "few normals score this
high". Flagging p <= alpha is exactly the ``fpr`` threshold of components/calibration.py
(score above the k-th smallest normal, k = ceil((n + 1)(1 - alpha))), written another way.

A score that is not a finite number gets p = 0: it is never "normal" (detector/scoring.py's
is_anomalous flags it too), so no rule built on p-values can fail open on it.
"""
from __future__ import annotations

import numpy as np


def p_values(scores: np.ndarray, calibration_normals: np.ndarray) -> np.ndarray:
    """The conformal p-value of each score against the calibration normals' scores."""
    normals = np.sort(np.asarray(calibration_normals, dtype=np.float64))
    if len(normals) == 0:
        raise ValueError("p-values need at least one normal calibration score")
    if not np.isfinite(normals).all():
        raise ValueError("the calibration normals' scores contain NaN or infinity")
    scores = np.asarray(scores, dtype=np.float64)
    at_least = len(normals) - np.searchsorted(normals, scores, side="left")  # normals scoring >= s
    p = (1.0 + at_least) / (len(normals) + 1.0)
    p[~np.isfinite(scores)] = 0.0
    return p


def flagged_at(p: np.ndarray, alpha: float, n: int) -> np.ndarray:
    """``p <= alpha`` without rounding trouble: p is (1 + c) / (n + 1) for a whole c, so the
    comparison is made on c (1 + c <= alpha (n + 1), a tiny tolerance for alpha's binary form)."""
    counts = np.rint(np.asarray(p, dtype=np.float64) * (n + 1))
    return counts <= alpha * (n + 1) + 1e-9


def benjamini_hochberg(p: np.ndarray, q: float) -> np.ndarray:
    """Which items to flag so that the expected share of normals among the flagged (the FDR) is
    at most ``q``: reject the k smallest p-values, k the largest with p_(k) <= k q / m.

    Conformal p-values against one calibration set are positively dependent (PRDS), so BH
    controls the FDR for them (Bates et al. 2023, Theorem 3)."""
    if not 0 < q < 1:
        raise ValueError(f"the FDR level q must be in (0, 1), got {q}")
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    flags = np.zeros(m, dtype=bool)
    if m == 0:
        return flags
    if np.isnan(p).any():
        raise ValueError("a p-value is NaN")
    order = np.argsort(p, kind="stable")
    passing = np.nonzero(p[order] <= q * np.arange(1, m + 1) / m)[0]
    if len(passing):
        flags[order[:passing[-1] + 1]] = True
    return flags
