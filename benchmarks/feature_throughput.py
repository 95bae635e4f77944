"""9. Feature families at night-sized scale: fit seconds per image at 1k and 10k images,
scoring throughput, model size and load time; on a GPU also bf16 against fp32.

PatchCore and PaDiM are fitted on 224 x 224 tiles of the real photographs of
benchmarks/surfaces.py (``TRAIN_NORMAL`` is far too few for a night, so tiles are cut at random
positions of the three textures) with EfficientNet-Lite0's packaged ImageNet weights and the
families' default settings (224 px, default layers, ``model.max_bank`` 10,000). The fit
is the train stage's own (``components.training.train``); scoring is
``detector.scoring.score`` on uint8 arrays (decoding is benchmark 2's subject).

On CUDA the backbone runs under bf16 autocast (the families' default there); the same fit
and scoring are also timed in fp32, and the two models' scores on a labelled texture are
compared (AUROC of each, and the largest relative score difference), which is what says
whether bf16 is safe. The CPU figure of the same comparison is the tolerance between a
CPU and a GPU fit.

Needs no pipeline import (it runs on a device machine that lacks the pipeline's packages).
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Context, Figure

TITLE = "9. Feature families at scale: fit s/image at 1k and 10k, scoring images/s, model size and load time"

MAX_BANK = 10_000   # params.yaml's default model.max_bank
SIZE = 224          # the families' default input size (params.yaml)


def tiles(count: int, side: int = SIZE, seed: int = 0) -> np.ndarray:
    """``count`` side x side tiles at random places of the three photographs (uint8, N x 1 x S x S)."""
    from benchmarks.surfaces import TEXTURES, photograph

    rng = np.random.default_rng(seed)
    photos = [photograph(name) for name in TEXTURES]
    out = np.empty((count, 1, side, side), np.uint8)
    for n in range(count):
        photo = photos[n % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        out[n, 0] = photo[y:y + side, x:x + side]
    return out


def _spec(family: str) -> dict:
    return {"family": family, "channels": 1, "image_size": SIZE, "backbone": "efficientnet_lite0",
            "layers": None, "backbone_weights": "auto", "coreset_ratio": 0.1, "max_bank": MAX_BANK, "num_neighbors": 9}


def _fit(family: str, images: np.ndarray, device: str, bf16: bool = True):
    import torch

    from detector import feature_detectors
    from components.training import TrainSettings, train

    settings = TrainSettings(epochs=1, batch_size=64, learning_rate=1e-3, seed=0, device=device)
    feature_detectors.BF16_ON_CUDA = bf16
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = train(_spec(family), images, np.zeros(len(images), np.float32), settings, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def _score_rate(model, images: np.ndarray, repeats: int) -> list[float]:
    import torch

    from detector.scoring import score

    cuda = next(model.parameters()).is_cuda
    score(model, images[:64], batch_size=64)  # warm-up: kernels, allocator
    rates = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        score(model, images, batch_size=256 if cuda else 64)
        if cuda:
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


def _load_seconds(result) -> float:
    """Rebuild the served module from its spec and load its state dict (what the pyfunc does
    after its imports), from a file on disk."""
    import io

    import torch

    from detector.networks import build

    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in result.model.state_dict().items()}, buffer)
    started = time.perf_counter()
    buffer.seek(0)
    model = build(result.spec)
    model.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    return time.perf_counter() - started


def _agreement(family: str, device: str) -> tuple[dict, dict]:
    """Fit on one labelled texture on the CPU and on ``device`` (bf16 and fp32 there): AUROCs and
    the largest relative score difference against the CPU's fp32 scores."""
    from sklearn.metrics import roc_auc_score

    from benchmarks.surfaces import resized, surface_set
    from detector.scoring import score

    data = surface_set("gravel", 0)
    normal, test = resized(data.train_x[data.train_y < 0.5], SIZE, 1), resized(data.test_x, SIZE, 1)
    reference = score(_fit(family, normal, "cpu")[0].model, test)
    out = {"cpu": roc_auc_score(data.test_y, reference)}
    differences = {}
    if device == "cuda":
        for name, bf16 in (("cuda_fp32", False), ("cuda_bf16", True)):
            values = score(_fit(family, normal, "cuda", bf16)[0].model, test)
            out[name] = roc_auc_score(data.test_y, values)
            differences[name] = float(np.max(np.abs(values - reference) / np.maximum(np.abs(reference), 1e-12)))
    return out, differences


def run(ctx: Context) -> list[Figure]:
    import torch

    from detector import feature_detectors

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    counts = (64, 256) if ctx.quick else (1_000, 10_000)
    images = tiles(max(counts))
    figures: list[Figure] = []
    try:
        for family in ("patchcore", "padim"):
            per_image = {}
            for count in counts:
                result, seconds = _fit(family, images[:count], device)
                per_image[count] = seconds / count
                figures.append(Figure(f"features.{family}.fit_ms_per_image_{count}", f"{family}: fit, {count} images",
                                      "ms/image", [1000 * seconds / count], higher_is_better=False,
                                      note=f"{where}; bank {result.summary['bank_size']}, "
                                           f"{result.summary['state_bytes'] / 1e6:.1f} MB"))
            figures.append(Figure(f"features.{family}.fit_per_image_ratio", f"{family}: fit per image, "
                                  f"{counts[1]} / {counts[0]} images", "ratio",
                                  [per_image[counts[1]] / per_image[counts[0]]], target="<= 1.2",
                                  met=per_image[counts[1]] / per_image[counts[0]] <= 1.2, higher_is_better=False))
            scored = 128 if ctx.quick else (2048 if cuda else 256)
            rates = _score_rate(result.model, images[:scored], ctx.repeats)
            figures.append(Figure(f"features.{family}.score_images_per_s", f"{family}: scoring", "images/s", rates,
                                  note=f"{where}, 1x{SIZE}x{SIZE} arrays", higher_is_better=True))
            figures.append(Figure(f"features.{family}.model_mb", f"{family}: served model size", "MB",
                                  [result.summary["state_bytes"] / 1e6], higher_is_better=False))
            figures.append(Figure(f"features.{family}.load_s", f"{family}: build + load state dict", "s",
                                  [_load_seconds(result) for _ in range(min(3, ctx.repeats))],
                                  higher_is_better=False, note="after the imports (anomalib's take ~5 s here)"))
            if cuda:
                fp32_result, fp32_seconds = _fit(family, images[:counts[0]], device, bf16=False)
                fp32_rates = _score_rate(fp32_result.model, images[:scored], ctx.repeats)
                figures.append(Figure(f"features.{family}.bf16_score_speedup", f"{family}: scoring bf16 / fp32",
                                      "ratio", [b / f for b, f in zip(rates, fp32_rates)], higher_is_better=True))
            if not ctx.quick:
                aurocs, differences = _agreement(family, device)
                figures.append(Figure(f"features.{family}.auroc_by_device", f"{family}: gravel AUROC by device",
                                      "AUROC", list(aurocs.values()), note=", ".join(f"{k} {v:.4f}" for k, v in
                                                                                   aurocs.items())))
                for name, value in differences.items():
                    figures.append(Figure(f"features.{family}.max_rel_diff_{name}",
                                          f"{family}: largest relative score difference, {name} vs CPU", "ratio",
                                          [value], higher_is_better=False))
    finally:
        feature_detectors.BF16_ON_CUDA = True
    return figures
