"""The feature-space two-sample test behind validate's image drift check: its false alarm rate
when nothing moved, and that it sees a moved batch (seeded simulations)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from components.drift import mmd_test


def test_same_distribution_is_rejected_at_most_at_the_level():
    rng = np.random.default_rng(0)
    repeats, level = 200, 0.05
    rejected = sum(mmd_test(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), permutations=99,
                            seed=i).p_value <= level for i in range(repeats))
    assert rejected / repeats <= level + 3 * math.sqrt(level * (1 - level) / repeats), rejected


def test_a_moved_batch_is_found():
    rng = np.random.default_rng(1)
    before = rng.normal(size=(60, 16))
    lighting = rng.normal(size=(60, 16)) + 0.8 * np.eye(16)[0]  # one feature shifted by 0.8 sd
    result = mmd_test(before, lighting, permutations=199)
    assert result.p_value <= 0.01 and result.statistic > 0
    assert mmd_test(before, rng.normal(size=(60, 16)), permutations=199).p_value > 0.01


def test_bad_feature_samples_are_refused_by_what_is_wrong():
    with pytest.raises(ValueError, match="same width"):
        mmd_test(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_test(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        mmd_test(np.full((5, 3), np.nan), np.zeros((5, 3)))
