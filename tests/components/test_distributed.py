"""Multi-process training with DistributedDataParallel, on the CPU with the gloo backend
(the same code path as GPUs with NCCL, less the devices; no GPU runs here).

Two processes under torchrun train each family on the same data as one process with the
same global batch, and must reach the same weights within TOLERANCE and the same scores
within SCORE_TOLERANCE. Not bit-identical: BatchNorm's statistics are summed across
processes in float64 (CpuSyncBatchNorm), and the gradient is the average of the processes'
shares instead of one sum, so float rounding differs, and Adam's steps carry it on. The
biases of convolutions that feed a BatchNorm are left out of the weight comparison (with
the running means that absorb them): their exact gradient is zero, so Adam turns rounding
noise into steps of up to the learning rate, and they change no output. The data makes each process's share uneven (batches
of 31 split 16 + 15) and ends each epoch on a batch of one image, which both processes take
whole. Then the train stage with ``train.devices: 2`` launches itself under torchrun, and
fails as a data error when its processes refuse the data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_workspace, run_cli, set_params

pytestmark = pytest.mark.slow

FAMILIES = ("deep_sad", "autoencoder", "classifier")
TOLERANCE = 5e-4        # largest absolute difference of a weight after 3 epochs (measured 5e-7, 8e-5, 1e-7)
SCORE_TOLERANCE = 1e-3  # largest relative difference of a score, both in eval mode (measured 3e-6 to 6e-5)

TRAIN = r"""
import os, sys
from pathlib import Path
import numpy as np, torch
import torch.distributed as dist
from components.training import TrainSettings, train
from detector.scoring import score

out = Path(sys.argv[1])
if "LOCAL_RANK" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
rng = np.random.default_rng(5)
images = rng.integers(0, 256, size=(63, 3, 32, 32), dtype=np.uint8)   # batches of 31, 31 and 1
labels = (np.arange(63) % 6 == 0).astype(np.float32)
settings = TrainSettings(epochs=3, batch_size=31, learning_rate=1e-3, seed=11, device="cpu", num_threads=1)
for family in sys.argv[2:]:
    spec = {"family": family, "channels": 3, "image_size": 32, "width": 8, "latent_dim": 16, "eta": 1.0}
    result = train(spec, images, labels, settings, progress=False)
    if rank == 0:
        torch.save({"state": result.model.state_dict(), "history": result.history,
                    "scores": torch.from_numpy(score(result.model, images))}, out / f"{family}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
"""


def _train(folder: Path, processes: int) -> dict[str, dict]:
    folder.mkdir()
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    script = folder / "train.py"
    script.write_text(TRAIN)
    done = subprocess.run([*launcher, str(script), str(folder), *FAMILIES], capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {family: torch.load(folder / f"{family}.pt", weights_only=True) for family in FAMILIES}


def _zero_gradient_keys(family: str) -> set[str]:
    """Biases of convolutions followed by a BatchNorm, and the running means that absorb them."""
    from detector.networks import build

    model = build({"family": family, "channels": 3, "image_size": 32, "width": 8, "latent_dim": 16})
    keys = set()
    for name, module in model.named_modules():
        children = list(module.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.modules.conv._ConvNd) and conv.bias is not None and \
                    isinstance(norm, torch.nn.BatchNorm2d):
                prefix = f"{name}." if name else ""
                keys |= {f"{prefix}{conv_name}.bias", f"{prefix}{norm_name}.running_mean"}
    return keys


def test_two_gloo_processes_reach_the_weights_of_one_process_with_the_same_global_batch(tmp_path):
    single, ddp = _train(tmp_path / "one", 1), _train(tmp_path / "two", 2)
    for family in FAMILIES:
        one, two = single[family]["state"], ddp[family]["state"]
        assert one.keys() == two.keys()
        compared = [k for k in one if one[k].is_floating_point() and k not in _zero_gradient_keys(family)]
        worst = max((one[k].double() - two[k].double()).abs().max().item() for k in compared)
        moved = max((one[k].double() - two[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
        a, b = single[family]["scores"].double(), ddp[family]["scores"].double()
        score_gap = ((a - b).abs() / a.abs().clamp_min(1e-6)).max().item()
        print(f"{family}: largest weight difference {worst:.2e} ({len(compared)} tensors; {moved:.2e} with the "
              f"zero-gradient biases), largest relative score difference {score_gap:.2e}")
        assert worst < TOLERANCE, (family, worst)
        assert score_gap < SCORE_TOLERANCE, (family, score_gap)
        assert len(compared) >= len(one) // 2
        losses = [(a["train_loss"], b["train_loss"]) for a, b in zip(single[family]["history"],
                                                                      ddp[family]["history"])]
        assert len(losses) == 3 and all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in losses), losses


def test_the_train_stage_with_two_devices_runs_two_processes_and_writes_one_model(tmp_path):
    root = make_workspace(tmp_path / "project", {"train": {"devices": 2, "epochs": 2, "num_threads": 0}})
    for stage in ("ingest", "validate", "preprocess"):
        run_cli(root, stage)
    result = run_cli(root, "train")
    assert "2 processes with DistributedDataParallel" in result.stdout
    metrics = json.loads((root / "reports" / "train.json").read_text())
    assert metrics["processes"] == 2 and metrics["resumed_from_epoch"] == 0
    # num_threads 0 is "all cores": each of the two processes takes its share of them
    assert metrics["threads"] == max(1, (os.cpu_count() or 1) // 2) and metrics["samples_per_second"] > 0
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "scores.parquet").is_file()
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any("module." in key for key in state)  # plain weights, loadable without a process group

    # a process that refuses the data (the loss overflows: Deep SAD's anomaly weight absurdly
    # high) fails the stage as a data error, exit 4 (no retry), with its message, as one process does
    set_params(root, train={"eta": 1e39})
    refused = run_cli(root, "train", check=False)
    assert refused.returncode == 4, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "train: the loss diverged: it became inf at epoch 1" in refused.stderr
