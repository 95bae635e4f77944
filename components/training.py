"""Training loop shared by the three families: seeded, checkpointed every epoch,
resumable, and loud about a diverging loss.

Inputs are uint8 arrays (N x C x S x S, as preprocess writes them; a memory-mapped
array works) and float labels (0 normal, 1 anomaly). Nothing here knows about files
other than the checkpoint folder it is handed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from components.models import DeepSAD, build

log = logging.getLogger(__name__)
CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP_CHECKPOINTS = 3


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite: the run stops and nothing is registered."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0


@dataclass
class TrainResult:
    model: torch.nn.Module
    spec: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    device: str = "cpu"


def select_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_deterministic(seed: int, num_threads: int, device: torch.device) -> None:
    """Same seed, data and thread count on the CPU -> bit-identical weights.

    ``use_deterministic_algorithms`` is switched on for CUDA only: it changes nothing for
    the CPU kernels these models use (their results depend on the thread count alone,
    which train.json records), and in torch 2.14 the call imports torch._inductor and
    torch._dynamo, 6 s of every train stage here (benchmarks/training.py measured it).
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if device.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or nothing where the C library has none (macOS, musl)."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_freed_memory = _malloc_trim()
# Each batch allocates and frees tens of MB of tensors; glibc keeps much of what is freed in
# its heaps instead of returning it, so the process grew about 5 KB per training image from
# 10k to 50k images and varied by 300 MB between runs, with no more live data (memray at the
# peak: 112 MB of heap). Handing it back every TRIM_EVERY batches and after each pass keeps
# the stage's memory independent of the data set's size (benchmarks/scale.py). A trim took
# about 1 ms here (10 ms the first time), against about 9 s of training per TRIM_EVERY batches.
# Batches are counted across epochs, so a small set's short epochs do not each end in a trim
# (what is handed back is faulted in again by the next batches).
TRIM_EVERY = 50


def to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    # a slice of a read-only memmap must be copied; a fancy-indexed batch is a copy already
    tensor = torch.from_numpy(batch if batch.flags.writeable else np.array(batch, copy=True))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(torch.float32, copy=True).div_(255.0)  # never scales the caller's array in place


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a checkpoint is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # an exception or a signal turned into one: leave no partial file
        tmp.unlink(missing_ok=True)
        raise


def _remove_partial_checkpoints(folder: Path) -> None:
    """A process killed outright (SIGKILL, power) mid-save leaves its temporary file."""
    for partial in folder.glob("epoch-*.pt.tmp"):
        log.warning("removing %s, left by a training that was killed while saving it", partial.name)
        partial.unlink(missing_ok=True)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.pt") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def load_latest_checkpoint(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint that loads and belongs to this exact run (same fingerprint).

    A truncated or foreign file is skipped with a warning and the previous one tried.
    Loading uses weights_only=True, so a checkpoint cannot run code.
    """
    for epoch, path in reversed(_checkpoints(folder)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated, corrupt, or a pickle that is not plain weights
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            log.warning("skipping unreadable checkpoint %s: %s", path.name, reason)
            continue
        if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
            log.info("ignoring checkpoint %s from a different run configuration", path.name)
            continue
        if int(state.get("epoch", -1)) != epoch:
            log.warning("skipping checkpoint %s: it holds epoch %s", path.name, state.get("epoch"))
            continue
        return state
    return None


def train(
    spec: dict[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train a model of spec['family'] on (images, labels) and return it with its history."""
    from tqdm.auto import tqdm

    if len(images) == 0:
        raise ValueError("no training images")
    device = select_device(settings.device)
    make_deterministic(settings.seed, settings.num_threads, device)
    labels = np.asarray(labels, dtype=np.float32)
    spec = dict(spec)
    if spec["family"] == "classifier":
        positives = float(labels.sum())
        if positives == 0:
            raise ValueError("the classifier needs labelled anomalies in the training split; found none")
        spec["pos_weight"] = float((len(labels) - positives) / positives)
    elif spec["family"] == "autoencoder" and not (labels < 0.5).any():
        raise ValueError("the autoencoder needs normal images in the training split; found none")

    model = build(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    start_epoch = 0

    if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
        _remove_partial_checkpoints(Path(checkpoint_dir))
    state = load_latest_checkpoint(Path(checkpoint_dir), fingerprint) if checkpoint_dir else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history = [dict(h) for h in state["history"]]
        start_epoch = int(state["epoch"])
        log.info("resuming from checkpoint epoch-%04d.pt: epochs 1-%d are done, %d to go",
                 start_epoch, start_epoch, settings.epochs - start_epoch)
    elif isinstance(model, DeepSAD):
        normal = np.flatnonzero(labels < 0.5)
        if len(normal) == 0:
            raise ValueError("Deep SAD needs normal images in the training split; found none")
        model.train()
        model.init_center(to_tensor(images[normal[i:i + settings.batch_size]], device)
                          for i in range(0, len(normal), settings.batch_size))

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n, step = len(images), 0
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=generator).numpy()
        total, seen = 0.0, 0
        batches = range(0, n, settings.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", disable=progress is False or None,
                          leave=False):
            index = np.sort(order[start:start + settings.batch_size])
            x = to_tensor(images[index], device)
            y = torch.from_numpy(labels[index]).to(device)
            with autocast:
                loss = model.loss(x, y)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"the loss diverged: it became {loss.item()} at epoch {epoch}, batch "
                    f"{start // settings.batch_size + 1} (learning rate {settings.learning_rate:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            seen += len(index)
            step += 1
            if step % TRIM_EVERY == 0:  # counted across epochs: a small data set's epoch is a few batches
                release_freed_memory()
        record = {"epoch": float(epoch), "train_loss": total / seen}
        history.append(record)
        log.info("epoch %d/%d train_loss=%.6f", epoch, settings.epochs, record["train_loss"])
        if checkpoint_dir is not None:
            _write_checkpoint(Path(checkpoint_dir), epoch, model, optimizer, generator, history, fingerprint)
        if on_epoch is not None:
            on_epoch(epoch, record)

    _recalibrate_batchnorm(model, images, settings.batch_size, device)
    model.eval()
    return TrainResult(model=model, spec=spec, history=history, resumed_from_epoch=start_epoch, device=device.type)


@torch.no_grad()
def _recalibrate_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int, device: torch.device) -> None:
    """Recompute BatchNorm's running statistics with the final weights.

    The running averages collected during training mix statistics from early,
    very different weights; scoring in eval mode with them gave near-random
    rankings after short runs (seen with Deep SAD). One extra pass over the
    training images with a cumulative average fixes that (as SWA's update_bn does).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(images), batch_size):
        model(to_tensor(images[start:start + batch_size], device))
        if (start // batch_size + 1) % TRIM_EVERY == 0:
            release_freed_memory()
    release_freed_memory()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def _write_checkpoint(folder: Path, epoch: int, model, optimizer, generator, history, fingerprint: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_save({
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "history": history,
    }, folder / f"epoch-{epoch:04d}.pt")
    for _, old in _checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)


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
