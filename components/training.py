"""Training loop shared by the three families: seeded, checkpointed (after every epoch, or
at most every ``checkpoint_every_s`` seconds and after the last), resumable, and loud about
a diverging loss.

Inputs are uint8 arrays (N x C x S x S, as preprocess writes them; a memory-mapped
array works), or float32 encoded table rows (N x features), and float labels (0 normal,
1 anomaly). Nothing here knows about files other than the checkpoint folder it is handed.

Called in every process of an initialised ``torch.distributed`` group (the train stage
under torchrun), it trains with DistributedDataParallel: each process takes its share of
every global batch, BatchNorm statistics are those of the whole global batch, and so the
weights follow the single-process run with the same batch size (tests/components/
test_distributed.py states how closely). Only the first process writes checkpoints.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from detector.networks import DeepSAD, build
from detector.scoring import TRIM_EVERY, libc, release_freed_memory, to_tensor

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
    # 0: a checkpoint after every epoch. Otherwise after the first epoch that ends this long
    # after the last checkpoint (or the start), and after the final epoch, so a finished
    # training can always be resumed without retraining. The weights do not depend on it.
    checkpoint_every_s: float = 0.0


@dataclass
class TrainResult:
    model: torch.nn.Module
    spec: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0
    device: str = "cpu"
    summary: dict[str, Any] = field(default_factory=dict)   # a fitted family's bank size, fit time, ...


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


# glibc's mallopt parameters (malloc.h) and the values train() sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20   # the most glibc accepts on 64 bits (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Fix glibc's allocator thresholds for this process, so a training loop stops paying
    page faults for memory it freed a moment ago; True where they were set.

    Each batch allocates and frees tens of MB of tensors. By default glibc moves its
    thresholds as it goes: a block above the mmap threshold is mapped and unmapped on every
    use (the threshold rises only as such blocks are freed), and the top of the heap is
    handed back whenever more than twice that threshold is free there. Every byte handed
    back is faulted in (and zeroed by the kernel) by the next batch. On 2026-12-02 a
    30-epoch Deep SAD training of 407 images took 0.2 to 1.5 million minor page faults (1-3 s
    of system time in a 7 s loop), a different number in every process: the main cause of
    the ±15-25 % spread between fresh processes running the same code. With blocks up to
    32 MB taken from the heap and up to 1 GB kept free at its top, the same loop took about
    23,000 faults and 0.07 s of system time, and ran 15-30 % faster.

    What the periodic ``malloc_trim`` (every TRIM_EVERY batches, until 2026-12-02) was for
    -- the process grew 5 KB per training image from 10k to 50k images -- does not happen
    with fixed thresholds (benchmarks/scale.py, three runs: 0.72-1.05 KB per extra image and
    515-535 MB at 50k, against 0.60 KB and 509 MB with the trims), so the loop no longer
    trims; the passes after it still do. The setting is process-wide and stays: train() is
    called by the train stage, a process of its own.
    """
    if libc() is None:
        return False
    return all(libc().mallopt(option, value) == 1
               for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))


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


def _distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across processes.

    torch's SyncBatchNorm runs on GPUs only; this is the same for the gloo backend. The
    per-channel sums and sums of squares (in float64, so E[x^2] - E[x]^2 keeps its digits) go
    through an autograd-aware all_reduce, so gradients flow through the shared statistics as
    they do through one process's. Evaluation uses the running statistics, as BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3), dtype=torch.float64), (x * x).sum((0, 2, 3), dtype=torch.float64),
                           torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)])
        total = all_reduce(local)
        count = total[-1]
        mean64 = total[:channels] / count
        var64 = (total[channels:2 * channels] / count - mean64 * mean64).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var64 * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(mean64.to(x.dtype) * factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(x.dtype) * factor)
        mean, inv_std = mean64.to(x.dtype), torch.rsqrt(var64 + self.eps).to(x.dtype)
        y = (x - mean[None, :, None, None]) * inv_std[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                synced = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
                synced.load_state_dict(child.state_dict())
                setattr(parent, name, synced)
    return model


class _Loss(nn.Module):
    """The model's loss as a module's forward: DistributedDataParallel synchronises the
    gradients of what runs through its own forward, and ``model.loss`` is not ``model()``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x, y)


def _share(batch: np.ndarray, labels: np.ndarray, rank: int, world: int, normal_only: bool) -> tuple[np.ndarray, float]:
    """This process's part of a global batch, and the factor that makes the mean of the
    processes' losses the global batch's loss.

    Normal and anomalous images are split separately, so every process gets normal images
    (the autoencoder's loss and BatchNorm statistics are over those alone: ``normal_only``).
    A batch with fewer images, or fewer normal images, than processes (an epoch's last) is
    taken whole by every process: the same gradient everywhere, so their mean is that gradient.
    """
    if world == 1:
        return batch, 1.0
    normal = batch[labels[batch] < 0.5]
    if len(batch) < world or len(normal) < world:
        return batch, 1.0
    anomalous = batch[labels[batch] >= 0.5]
    part = np.sort(np.concatenate([np.array_split(normal, world)[rank], np.array_split(anomalous, world)[rank]]))
    if normal_only:
        return part, float((labels[part] < 0.5).sum() * world / len(normal))
    return part, len(part) * world / len(batch)


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
    """Train a model of spec['family'] on (images, labels) and return it with its history.

    The feature families (PatchCore, PaDiM) are fitted in one pass instead
    (training.fit_features): no epochs, no checkpoints, an empty history."""
    from tqdm.auto import tqdm

    from detector.feature_detectors import FEATURE_FAMILIES

    if len(images) == 0:
        raise ValueError("no training images")
    if spec["family"] in FEATURE_FAMILIES:
        return fit_features(spec, images, labels, settings, progress=progress)
    rank, world = _distributed()
    device = select_device(settings.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # the stage set this process's GPU
    make_deterministic(settings.seed, settings.num_threads, device)
    keep_freed_memory()
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
    if world > 1:
        model = _sync_batchnorm(model, device)
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

    if world > 1:  # after the checkpoint or the centre: every process starts from the same state
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(_Loss(model), device_ids=[device.index] if device.type == "cuda" else None)
    else:
        forward = model.loss
    normal_only = getattr(model, "loss_over_normal_only", False)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n = len(images)
    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        epoch_started = time.monotonic()
        model.train()
        order = torch.randperm(n, generator=generator).numpy()
        total, seen = 0.0, 0
        batches = range(0, n, settings.batch_size)
        for start in tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", disable=progress is False or None,
                          leave=False):
            batch = np.sort(order[start:start + settings.batch_size])
            if normal_only and not (labels[batch] < 0.5).any():
                continue  # the autoencoder learns from normal images only: nothing here to step on
            index, weight = _share(batch, labels, rank, world, normal_only)
            x = to_tensor(images[index], device)
            y = torch.from_numpy(labels[index]).to(device)
            with autocast:
                loss = forward(x, y)
            if weight != 1.0:
                loss = loss * weight
            batch_loss = _global_mean(loss.detach(), world)  # every process sees a divergence at once
            if not torch.isfinite(batch_loss):
                raise TrainingDivergedError(
                    f"the loss diverged: it became {batch_loss.item()} at epoch {epoch}, batch "
                    f"{start // settings.batch_size + 1} (learning rate {settings.learning_rate:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(batch_loss) * len(batch)
            seen += len(batch)
        # seconds: the epoch's batches, not its checkpoint (train.json's and MLflow's epoch_seconds)
        record = {"epoch": float(epoch), "train_loss": total / seen, "seconds": time.monotonic() - epoch_started}
        history.append(record)
        log.info("epoch %d/%d train_loss=%.6f", epoch, settings.epochs, record["train_loss"])
        if checkpoint_dir is not None and rank == 0 and (
                epoch == settings.epochs or time.monotonic() - last_checkpoint >= settings.checkpoint_every_s):
            _write_checkpoint(Path(checkpoint_dir), epoch, model, optimizer, generator, history, fingerprint)
            last_checkpoint = time.monotonic()
        if on_epoch is not None:
            on_epoch(epoch, record)

    _recalibrate_batchnorm(model, images, settings.batch_size, device)
    if world > 1:  # the plain modules again (same state): scoring and saving need no process group
        plain = build(spec).to(device)
        plain.load_state_dict(model.state_dict())
        model = plain
    model.eval()
    return TrainResult(model=model, spec=spec, history=history, resumed_from_epoch=start_epoch, device=device.type)


def _global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return value / world


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
    rank, world = _distributed()
    for start in range(0, len(images), batch_size):
        low, high = start, min(start + batch_size, len(images))
        if world > 1:  # each process its share (maybe none): the synchronised statistics are the batch's
            part = np.array_split(np.arange(low, high), world)[rank]
            low, high = (int(part[0]), int(part[-1]) + 1) if len(part) else (low, low)
        model(to_tensor(images[low:high], device))
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


def fit_features(spec: dict[str, Any], images: np.ndarray, labels: np.ndarray, settings, progress: bool | None = None):
    """Fit a feature family on the normal images of (images, labels): one pass, no epochs.

    Seeded like training (``settings.seed``; PaDiM's feature draw and PatchCore's coreset
    are random), so the same images, settings and thread count give the same bank."""
    from tqdm.auto import tqdm

    from detector.feature_detectors import build as build_features

    normal = np.flatnonzero(np.asarray(labels) < 0.5)
    if len(normal) == 0:
        raise ValueError(f"{spec['family']} fits on normal images; the training split has none")
    device = select_device(settings.device)
    make_deterministic(settings.seed, settings.num_threads, device)
    # the allocator settings of the training loop (keep_freed_memory says why): each batch of
    # features allocates and frees tens of MB. The coreset's own page faults (one pool-sized
    # tensor per selected patch in anomalib) are avoided where they arise: patchcore._coreset
    keep_freed_memory()
    spec = dict(spec)
    started = time.perf_counter()
    model = build_features(spec, load_weights=True).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    model.begin_fit(len(normal))
    batch = max(1, settings.batch_size)
    for start in tqdm(range(0, len(normal), batch), desc=f"fit {spec['family']}", leave=False,
                      disable=progress is False or None):
        model.add(to_tensor(images[normal[start:start + batch]], device), generator)
    summary = model.end_fit()
    summary.update(fit_images=int(len(normal)), fit_seconds=round(time.perf_counter() - started, 3),
                   state_bytes=int(sum(t.numel() * t.element_size() for t in model.state_dict().values())))
    log.info("%s fitted on %d normal images: %s", spec["family"], len(normal), summary)
    model.eval()
    return TrainResult(model=model, spec=spec, history=[], device=device.type, summary=summary)
