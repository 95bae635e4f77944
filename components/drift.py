"""Has tonight's batch moved away from the last one? A two-sample test in feature space.

Per-column checks catch a table column that drifts; images have no columns worth checking one
by one, but a feature extractor (the pretrained backbone, or the model's own encoder) maps each
image to a vector, and two sets of vectors can be compared as wholes. The maximum mean
discrepancy (Gretton et al., "A kernel two-sample test", JMLR 2012) with a Gaussian kernel is
zero exactly when the two distributions are equal; its p-value comes from permutations of the
pooled sample, so it is exact at any sample size and needs no assumption about the features.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DriftTest:
    statistic: float       # the (biased) squared MMD of the two samples
    p_value: float         # (1 + #{permuted MMD >= observed}) / (1 + permutations)
    n_before: int
    n_now: int
    permutations: int
    bandwidth: float       # the Gaussian kernel's scale: the median distance of the pooled sample

    def as_dict(self) -> dict:
        return asdict(self)


def _squared_distances(z: np.ndarray) -> np.ndarray:
    norms = (z * z).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2.0 * z @ z.T, 0.0)


def mmd_test(before: np.ndarray, now: np.ndarray, permutations: int = 500, seed: int = 0,
             max_items: int = 1000) -> DriftTest:
    """Permutation test of "both samples come from one distribution" on feature vectors.

    Each sample is subsampled (with ``seed``) to ``max_items`` so the kernel matrix stays small
    (1,000 + 1,000 items: a 2,000 x 2,000 matrix, 32 MB); the p-value is still exact for the
    subsample."""
    before, now = np.asarray(before, dtype=np.float64), np.asarray(now, dtype=np.float64)
    if before.ndim != 2 or now.ndim != 2 or before.shape[1] != now.shape[1]:
        raise ValueError(f"feature samples must be 2-D with the same width, got {before.shape} and {now.shape}")
    if len(before) < 2 or len(now) < 2:
        raise ValueError(f"a two-sample test needs at least 2 items on each side, got {len(before)} and {len(now)}")
    if not (np.isfinite(before).all() and np.isfinite(now).all()):
        raise ValueError("a feature vector holds NaN or infinity")
    rng = np.random.default_rng(seed)
    if len(before) > max_items:
        before = before[rng.choice(len(before), max_items, replace=False)]
    if len(now) > max_items:
        now = now[rng.choice(len(now), max_items, replace=False)]
    pooled = np.concatenate([before, now])
    distances = _squared_distances(pooled)
    off_diagonal = distances[~np.eye(len(pooled), dtype=bool)]
    bandwidth = float(np.sqrt(np.median(off_diagonal))) or 1.0  # identical items: any scale gives MMD 0
    kernel = np.exp(-distances / (2 * bandwidth ** 2))
    m = len(before)

    def statistic(order: np.ndarray) -> float:
        first, second = order[:m], order[m:]
        return float(kernel[np.ix_(first, first)].mean() + kernel[np.ix_(second, second)].mean()
                     - 2 * kernel[np.ix_(first, second)].mean())

    observed = statistic(np.arange(len(pooled)))
    at_least = sum(statistic(rng.permutation(len(pooled))) >= observed - 1e-12 for _ in range(permutations))
    return DriftTest(statistic=observed, p_value=(1 + at_least) / (1 + permutations), n_before=m,
                     n_now=len(now), permutations=permutations, bandwidth=bandwidth)
