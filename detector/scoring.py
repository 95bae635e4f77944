"""Scoring a batch of items (uint8 images or encoded table rows) with a model of any family,
in order, in batches; and the one rule that turns a score into a flag."""
from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def libc():
    """glibc, loaded on first use (not when a model is imported), or None where the C library
    is another (macOS, musl): then nothing is tuned."""
    try:
        import ctypes

        handle = ctypes.CDLL("libc.so.6")
        handle.malloc_trim.argtypes, handle.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        handle.mallopt.argtypes, handle.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return handle
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """glibc's ``malloc_trim(0)``: hand what the heaps hold free back to the system."""
    if libc() is not None:
        libc().malloc_trim(0)


# The passes over a split (BatchNorm re-estimate, scoring) also run where train() never ran
# (the registered model's predict in a serving process): there glibc's defaults hold, and what
# a pass frees may stay with the process. A trim every TRIM_EVERY batches and after each pass
# hands it back (benchmarks/scale.py keeps the stage flat); a trim took about 1 ms here.
TRIM_EVERY = 50


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    # a slice of a read-only memmap must be copied; a fancy-indexed batch is a copy already
    tensor = torch.from_numpy(batch if batch.flags.writeable else np.array(batch, copy=True))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    if batch.dtype != np.uint8:  # encoded table rows: float already
        return tensor.to(torch.float32, copy=True)
    return tensor.to(torch.float32, copy=True).div_(255.0)  # never scales the caller's array in place


@torch.no_grad()
def score(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256, device: str | None = None) -> np.ndarray:
    """Anomaly scores (float64, higher = more anomalous) for uint8 images, in order."""
    model.eval()
    target = torch.device(device) if device else next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        out.append(model.score(to_tensor(images[start:start + batch_size], target)).float().cpu().numpy())
        if (start // batch_size + 1) % TRIM_EVERY == 0:
            release_freed_memory()
    release_freed_memory()
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def score_and_maps(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64,
                   device: str | None = None, map_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float64) and anomaly maps (float32, N x S x S, or N x map_size x map_size
    resized by area: a split's maps at full size would take 200 KB an image) of a feature
    family's model, which has ``score_and_map``; the other families have no map."""
    if not hasattr(model, "score_and_map"):
        raise ValueError(f"a {type(model).__name__} model gives no anomaly map (only patchcore and padim do)")
    model.eval()
    target = torch.device(device) if device else next(model.parameters()).device
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        batch_scores, batch_maps = model.score_and_map(to_tensor(images[start:start + batch_size], target))
        if map_size is not None and map_size < batch_maps.shape[-1]:
            batch_maps = torch.nn.functional.interpolate(batch_maps[:, None], size=(map_size, map_size),
                                                         mode="area")[:, 0]
        scores.append(batch_scores.float().cpu().numpy())
        maps.append(batch_maps.float().cpu().numpy())
    if not scores:
        side = min(images.shape[-1], map_size or images.shape[-1]) if images.ndim == 4 else 0
        return np.zeros(0), np.zeros((0, side, side), dtype=np.float32)
    return np.concatenate(scores).astype(np.float64), np.concatenate(maps)


def is_anomalous(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The flags of ``scores``: an item is normal only when its score is a finite number at or
    below the threshold. A score that is not a finite number (NaN, or -inf as much as +inf:
    the network's arithmetic overflowed on an input far outside anything it was trained on)
    is never read as normal: it is flagged, and the score is returned as it is."""
    scores = np.asarray(scores, dtype=np.float64)
    return ~(np.isfinite(scores) & (scores <= threshold))
