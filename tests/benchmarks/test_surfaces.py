"""The realistic set of benchmark 7c: real photographs (scikit-image's wheel), seeded, with
train and test tiles from disjoint parts of each photograph and every defect drawn."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.surfaces import KINDS, TILE, TRAIN_SHARE, draw_defect, photograph, surface_set, texture_sigma

SMALL = dict(train_normal=12, test_normal=6, test_per_kind=3, labelled_per_kind=1)


def test_the_set_is_seeded_labelled_and_shaped():
    first, again = surface_set("brick", 1, **SMALL), surface_set("brick", 1, **SMALL)
    np.testing.assert_array_equal(first.test_x, again.test_x)
    assert not np.array_equal(first.test_x, surface_set("brick", 2, **SMALL).test_x)
    assert first.train_x.shape == (12 + len(KINDS), 1, TILE, TILE) and first.train_x.dtype == np.uint8
    assert first.train_y.tolist() == [0] * 12 + [1] * len(KINDS)
    assert first.test_kind.tolist() == ["good"] * 6 + [k for k in KINDS for _ in range(3)]
    assert first.test_y.tolist() == [0] * 6 + [1] * 3 * len(KINDS)


def test_train_and_test_tiles_come_from_disjoint_columns_of_the_photograph():
    """Every training tile is found left of the split, and no test tile is."""
    image = photograph("gravel")
    split = int(image.shape[1] * TRAIN_SHARE)
    data = surface_set("gravel", 0, **SMALL)

    def column_of(tile: np.ndarray) -> int:
        from skimage.feature import match_template

        scores = match_template(image, tile)  # one value per top-left corner
        return int(np.unravel_index(np.argmax(scores), scores.shape)[1])

    assert all(column_of(t[0]) + TILE <= split for t in data.train_x[:12])
    assert all(column_of(t[0]) >= split for t in data.test_x[:6])


@pytest.mark.parametrize("kind", KINDS)
def test_each_defect_changes_the_tile_locally_and_in_proportion_to_the_texture(kind):
    image = photograph("grass")
    tile = image[:TILE, :TILE].copy()
    changed = draw_defect(tile, kind, np.random.default_rng(3), texture_sigma(image))
    moved = np.abs(changed.astype(int) - tile.astype(int)) > 0
    assert moved.any() and moved.mean() < 0.1  # small: a defect, not a new picture
    with pytest.raises(ValueError, match="unknown defect kind"):
        draw_defect(tile, "dent", np.random.default_rng(0), 1.0)


def test_texture_sigma_is_the_local_contrast():
    flat = np.full((64, 64), 100, np.uint8)
    assert texture_sigma(flat) == 0.0
    assert texture_sigma(photograph("brick")) < texture_sigma(photograph("grass"))


def test_the_frozen_feature_head_learns_to_single_out_an_odd_patch():
    """Item 6's measurement head (benchmarks/frozen_head.py): normal images are patches from one
    cloud; a defective image has one patch far from it. The head must rank those first."""
    import torch
    from sklearn.metrics import roc_auc_score

    from benchmarks.frozen_head import deep_sad_head_scores

    generator = torch.Generator().manual_seed(0)

    def images(count: int, defective: bool) -> torch.Tensor:
        features = torch.randn(count, 49, 8, generator=generator)
        if defective:
            features[:, 7] += 6.0
        return features

    train = torch.cat([images(40, False), images(4, True)])
    test = torch.cat([images(20, False), images(20, True)])
    scores = deep_sad_head_scores(train, np.r_[np.zeros(40), np.ones(4)], test, seed=0)
    assert roc_auc_score(np.r_[np.zeros(20), np.ones(20)], scores) > 0.9
