"""A deterministic generator of surface-inspection images.

Two texture families (brushed metal, woven fabric) with four kinds of defect
(scratch, spot, crack, discolouration), written as PNG files in the layout the
pipeline ingests: ``<landing>/<batch>/<label>/<name>.png``. Every image is a
pure function of (seed, label, index), so a batch can be regenerated bit for bit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TEXTURES = ("brushed_metal", "woven_fabric")
DEFECTS = ("scratch", "spot", "crack", "discolouration")
BATCH_PATTERN = re.compile(r"^batch-(\d{4,})$")


@dataclass(frozen=True)
class BatchSpec:
    n_good: int = 500
    n_per_defect: int = 40
    size: int = 128


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    return np.asarray(noise.filter(ImageFilter.GaussianBlur(scale)), dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, family: str, size: int) -> np.ndarray:
    """An RGB float image in [0, 1] of one texture family with random lighting."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if family == "brushed_metal":
        streaks = rng.normal(0, 1, (size, 1)).astype(np.float32)
        streaks = np.repeat(streaks, size, axis=1) * 0.04 + rng.normal(0, 0.015, (size, size)).astype(np.float32)
        base = 0.55 + rng.uniform(-0.05, 0.05) + streaks
        tint = np.array([0.95, 0.98, 1.05]) * rng.uniform(0.95, 1.05, 3)
    else:
        period = rng.uniform(7.0, 10.0)
        phase = rng.uniform(0, 2 * np.pi, 2)
        weave = np.sin(2 * np.pi * xx * size / period + phase[0]) * np.sin(2 * np.pi * yy * size / period + phase[1])
        base = 0.6 + rng.uniform(-0.04, 0.04) + 0.07 * weave + 0.05 * (_smooth_noise(rng, size, 1.2) - 0.5)
        tint = np.array([1.08, 0.98, 0.82]) * rng.uniform(0.96, 1.04, 3)
    gradient = rng.uniform(-0.06, 0.06) * (xx - 0.5) + rng.uniform(-0.06, 0.06) * (yy - 0.5)
    image = (base + gradient)[..., None] * tint[None, None, :]
    return np.clip(image, 0, 1)


def _mask(size: int, draw_fn) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _add_defect(rng: np.random.Generator, image: np.ndarray, defect: str) -> np.ndarray:
    size = image.shape[0]
    margin = size // 8
    cx, cy = rng.integers(margin, size - margin, 2)
    if defect == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.18, 0.35) * size
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        width = int(rng.integers(1, 3))
        mask = _mask(size, lambda d: d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width))
        shade = rng.choice([-0.35, 0.35])
        return np.clip(image + shade * mask[..., None], 0, 1)
    if defect == "spot":
        radius = rng.uniform(3.0, 7.0)
        mask = _mask(size, lambda d: d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255))
        mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255
        return np.clip(image * (1 - 0.6 * mask[..., None]), 0, 1)
    if defect == "crack":
        points = [(float(cx), float(cy))]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(8, 14))):
            heading += rng.normal(0, 0.6)
            step = rng.uniform(3, 6)
            x, y = points[-1]
            points.append((x + step * np.cos(heading), y + step * np.sin(heading)))
        mask = _mask(size, lambda d: d.line(points, fill=255, width=2))
        return np.clip(image * (1 - 0.65 * mask[..., None]), 0, 1)
    if defect == "discolouration":
        radius = rng.uniform(0.15, 0.25) * size
        mask = _mask(size, lambda d: d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255))
        mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius / 3)), np.float32) / 255
        stain = np.array([1.0, 0.55, 0.35]) if rng.random() < 0.5 else np.array([0.55, 0.75, 1.0])
        return np.clip(image * (1 - 0.6 * mask[..., None] * (1 - stain[None, None, :])), 0, 1)
    raise ValueError(f"unknown defect kind: {defect!r} (known: {', '.join(DEFECTS)})")


def make_image(seed: int, label: str, index: int, size: int = 128) -> Image.Image:
    """One RGB image; label 'good' or one of DEFECTS. Deterministic in its arguments."""
    label_key = 0 if label == "good" else 1 + DEFECTS.index(label) if label in DEFECTS else None
    if label_key is None:
        raise ValueError(f"unknown label: {label!r} (known: good, {', '.join(DEFECTS)})")
    rng = np.random.default_rng([seed, label_key, index])
    family = TEXTURES[int(rng.integers(len(TEXTURES)))]
    image = _texture(rng, family, size)
    if label != "good":
        image = _add_defect(rng, image, label)
    image = image + rng.normal(0, 0.01, image.shape)  # sensor noise
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def write_batch(landing: Path, batch: str, seed: int, spec: BatchSpec = BatchSpec()) -> Path:
    """Write one batch folder; refuses to overwrite an existing batch (landing data is never rewritten)."""
    folder = Path(landing) / batch
    if folder.exists():
        raise FileExistsError(f"batch folder already exists: {folder}")
    tmp = folder.with_name(f".{batch}.partial")
    jobs = [("good", i) for i in range(spec.n_good)] + [(d, i) for d in DEFECTS for i in range(spec.n_per_defect)]
    for label, index in jobs:
        target = tmp / label / f"{batch}_{label}_{index:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        make_image(seed, label, index, spec.size).save(target, format="PNG", optimize=False)
    tmp.rename(folder)  # a reader never sees half a batch
    return folder


def next_batch_name(landing: Path) -> tuple[str, int]:
    """The name and seed offset of the batch after the newest one in landing."""
    numbers = [int(m.group(1)) for p in Path(landing).glob("batch-*")
               if (m := BATCH_PATTERN.match(p.stem if p.is_file() else p.name))]  # a table's batch-0001.csv too
    number = max(numbers, default=0) + 1
    return f"batch-{number:04d}", number
