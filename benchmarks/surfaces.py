"""A realistic image set from real photographs: surfaces with small, drawn defects.

Why: on the generated default data every family scores 1.0, so it cannot tell detectors
apart. These are real photographed textures that scikit-image ships in its wheel
(``skimage.data.brick``, ``grass``, ``gravel``: 512 x 512 grey photographs), cut into
128 x 128 tiles; the defects are drawn on the photographs the way an inspection line
sees them: thin bright scratches, dark cracks, small spots, and two low-contrast kinds
(a faint stain, and a smudge where the texture is blurred away).

Protocol (stated in benchmarks/RESULTS.md with the figures):

* Each texture is one category, like MVTec AD's texture categories. Training tiles are
  cut from the left 55 % of the photograph, test tiles from the right 45 %, so no test
  pixel was seen in training (tiles within a side overlap, as frames of one surface do).
* Per category: ``TRAIN_NORMAL`` normal training tiles plus ``LABELLED_PER_KIND`` labelled
  defects of each kind (for the families that use labels; PatchCore and PaDiM fit on the
  normal ones only); ``TEST_NORMAL`` normal test tiles and ``TEST_PER_KIND`` of each kind.
* A defect's size, place, orientation and contrast are drawn at random from the ranges
  in ``DEFECTS``; the seed fixes everything.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURES = ("brick", "grass", "gravel")
TILE = 128
TRAIN_SHARE = 0.55          # the left share of the photograph gives the training tiles
TRAIN_NORMAL = 200
LABELLED_PER_KIND = 4
TEST_NORMAL = 100
TEST_PER_KIND = 20

# kind: what it looks like. Contrast is in units of the photograph's own texture, sigma = the
# median standard deviation of its 9 x 9 neighbourhoods (brick 5.6 grey levels, grass 32,
# gravel 30): a fixed number of grey levels would be glaring on brick's smooth faces and
# invisible in grass, where no inspector could see it either.
DEFECTS = {
    "scratch": "a thin bright line, 1-2 px wide, 25-60 px long, +3 to +6 sigma",
    "crack": "a dark random walk, 1 px wide, 30-60 steps, -3 to -6 sigma",
    "spot": "a disc of radius 2-5 px, +-3 to 6 sigma",
    "stain": "low contrast: a Gaussian blob, sigma 5-10 px, +-1.5 to 3 sigma at its centre",
    "smudge": "low contrast: a 16-24 px square where the texture is blurred (Gaussian, 2-3 px)",
}
KINDS = tuple(DEFECTS)


@dataclass
class SurfaceSet:
    """uint8 grey tiles (N x 1 x TILE x TILE) and labels; ``test_kind`` is 'good' or the defect."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_kind: np.ndarray


def photograph(name: str) -> np.ndarray:
    """The texture's photograph as uint8 grey (shipped in scikit-image's wheel: no download)."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 3:
        image = (image[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return image


def _tiles(image: np.ndarray, train: bool, count: int, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape
    split = int(width * TRAIN_SHARE)
    low, high = (0, split - TILE) if train else (split, width - TILE)
    ys = rng.integers(0, height - TILE + 1, count)
    xs = rng.integers(low, high + 1, count)
    return np.stack([image[y:y + TILE, x:x + TILE] for y, x in zip(ys, xs)])


def texture_sigma(image: np.ndarray) -> float:
    """The median standard deviation of the photograph's 9 x 9 neighbourhoods: its texture's contrast."""
    from scipy.ndimage import uniform_filter

    pixels = image.astype(np.float64)
    mean = uniform_filter(pixels, 9)
    variance = np.clip(uniform_filter(pixels * pixels, 9) - mean * mean, 0, None)
    return float(np.sqrt(np.median(variance)))


def draw_defect(tile: np.ndarray, kind: str, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """One defect of ``kind`` on a copy of ``tile`` (uint8, TILE x TILE), its contrast in
    units of ``sigma`` (``texture_sigma`` of the photograph)."""
    from scipy.ndimage import gaussian_filter
    from skimage.draw import disk, line_aa

    out = tile.astype(np.float64)
    margin = 16
    y0, x0 = rng.integers(margin, TILE - margin, 2)
    if kind == "scratch":
        length, angle = rng.uniform(25, 60), rng.uniform(0, np.pi)
        y1 = int(np.clip(y0 + length * np.sin(angle), 0, TILE - 1))
        x1 = int(np.clip(x0 + length * np.cos(angle), 0, TILE - 1))
        delta = rng.uniform(3, 6) * sigma
        for offset in range(int(rng.integers(1, 3))):
            rr, cc, val = line_aa(int(y0), int(x0) + offset, y1, min(x1 + offset, TILE - 1))
            out[rr, cc] += delta * val
    elif kind == "crack":
        delta = rng.uniform(3, 6) * sigma
        y, x = float(y0), float(x0)
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(30, 61))):
            heading += rng.normal(0, 0.5)
            y = float(np.clip(y + np.sin(heading), 0, TILE - 1))
            x = float(np.clip(x + np.cos(heading), 0, TILE - 1))
            out[int(y), int(x)] = min(out[int(y), int(x)], tile[int(y), int(x)] - delta)
    elif kind == "spot":
        rr, cc = disk((y0, x0), rng.uniform(2, 5), shape=out.shape)
        out[rr, cc] += rng.choice([-1, 1]) * rng.uniform(3, 6) * sigma
    elif kind == "stain":
        width = rng.uniform(5, 10)
        yy, xx = np.mgrid[:TILE, :TILE]
        out += (rng.choice([-1, 1]) * rng.uniform(1.5, 3) * sigma
                * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * width ** 2)))
    elif kind == "smudge":
        half = int(rng.integers(8, 13))
        blurred = gaussian_filter(out, rng.uniform(2, 3))
        out[y0 - half:y0 + half, x0 - half:x0 + half] = blurred[y0 - half:y0 + half, x0 - half:x0 + half]
    else:
        raise ValueError(f"unknown defect kind {kind!r} (known: {', '.join(KINDS)})")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def surface_set(name: str, seed: int = 0, train_normal: int = TRAIN_NORMAL, test_normal: int = TEST_NORMAL,
                test_per_kind: int = TEST_PER_KIND, labelled_per_kind: int = LABELLED_PER_KIND) -> SurfaceSet:
    """One category of the realistic set, fixed by ``seed``."""
    rng = np.random.default_rng([seed, TEXTURES.index(name) if name in TEXTURES else 99])
    image = photograph(name)
    sigma = texture_sigma(image)
    train_good = _tiles(image, True, train_normal, rng)
    labelled = [draw_defect(t, kind, rng, sigma) for kind in KINDS
                for t in _tiles(image, True, labelled_per_kind, rng)]
    test_good = _tiles(image, False, test_normal, rng)
    test_bad = [draw_defect(t, kind, rng, sigma) for kind in KINDS for t in _tiles(image, False, test_per_kind, rng)]
    train_x = np.concatenate([train_good] + ([np.stack(labelled)] if labelled else []))[:, None]
    test_x = np.concatenate([test_good, np.stack(test_bad)])[:, None]
    kinds = np.array(["good"] * test_normal + [kind for kind in KINDS for _ in range(test_per_kind)])
    return SurfaceSet(name, train_x, np.r_[np.zeros(train_normal), np.ones(len(labelled))].astype(np.float32),
                      test_x, (kinds != "good").astype(np.float32), kinds)


def resized(images: np.ndarray, size: int, channels: int = 3) -> np.ndarray:
    """Tiles at the model's input size, through the pipeline's own decode path
    (detector.decode.to_array: bilinear, antialiased; grey -> RGB for channels 3)."""
    from PIL import Image

    from detector.decode import to_array

    return np.stack([to_array(Image.fromarray(tile[0], mode="L"), size, channels) for tile in images])


def write_landing(folder, name: str, seed: int = 0, **sizes) -> None:
    """The set as a landing batch (``<folder>/<name>/{good,<kind>}/*.png``), train and test
    tiles together: what a user would point the pipeline at."""
    from pathlib import Path

    from PIL import Image

    surfaces = surface_set(name, seed, **sizes)
    root = Path(folder) / name
    kinds = np.r_[np.where(surfaces.train_y > 0.5, "defect", "good"), surfaces.test_kind]
    labelled_kinds = iter([kind for kind in KINDS for _ in range(sizes.get("labelled_per_kind", LABELLED_PER_KIND))])
    for n, (tile, kind) in enumerate(zip(np.concatenate([surfaces.train_x, surfaces.test_x]), kinds)):
        label = next(labelled_kinds) if kind == "defect" else kind
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile[0], mode="L").save(root / label / f"{name}-{n:04d}.png")


def heatmap_figure(path, texture: str = "gravel", kinds: tuple[str, ...] = ("spot", "scratch"), seed: int = 42) -> None:
    """docs/images/heatmap.png, the picture in docs/detectors.md: PatchCore (params.yaml's
    defaults: lite0, 224 px) fitted on the texture's normal training tiles, and its anomaly map
    on one test tile of each kind, the threshold set at the 95th percentile of the normal test
    tiles' scores (the map's 128)."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from components.heatmaps import overlay
    from components.training import TrainSettings, train
    from detector.scoring import score_and_maps

    data = surface_set(texture, seed)
    spec = {"family": "patchcore", "channels": 3, "image_size": 224, "backbone": "efficientnet_lite0", "layers": None,
            "backbone_weights": "auto", "coreset_ratio": 0.1, "max_bank": 10_000, "num_neighbors": 9}
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=1e-3, seed=seed, device="cpu")
    result = train(spec, resized(data.train_x, 224), data.train_y, settings, progress=False)
    scores, maps = score_and_maps(result.model, resized(data.test_x, 224))
    threshold = float(np.quantile(scores[data.test_kind == "good"], 0.95))
    panels = []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in kinds:
            rows = np.flatnonzero(data.test_kind == kind)
            row = int(rows[np.argsort(scores[rows])[len(rows) // 2]])  # the median-scored one: no cherry-picking
            target = Path(scratch) / f"{kind}.png"
            overlay(resized(data.test_x[row:row + 1], 224, 1)[0], maps[row], threshold,
                    f"{texture}, {kind}: score {scores[row]:.3g} (threshold {threshold:.3g})", target)
            panels.append(Image.open(target).convert("RGB"))
    width = sum(p.width for p in panels)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width
    canvas.save(path)
