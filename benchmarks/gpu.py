"""8. Mixed precision: training samples per second with bf16 autocast against fp32.

On a CUDA device (where the train stage always uses bf16 autocast) the two are timed
side by side on the same model and data, with the GPU's utilisation sampled from
nvidia-smi while each runs. Without one, the same comparison runs on the CPU (where the
stage trains in fp32: CPU bf16 is slower unless the processor has AMX/AVX512-BF16), so
the figure is still measured and labelled with the device it ran on.
"""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

from benchmarks.common import Context, Figure, ratios

TITLE = "8. bf16 autocast vs fp32 training (GPU when there is one)"


class _Utilisation:
    """nvidia-smi's utilization.gpu sampled every 0.2 s while the block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "--id=0"], capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.strip().splitlines()[0]))

    def __enter__(self) -> "_Utilisation":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _epochs(model, optimizer, images, labels, batch: int, epochs: int, device, bf16: bool) -> float:
    """Samples per second of ``epochs`` passes of forward/loss/backward/step."""
    import torch

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), device=device)
        for start in range(0, len(images), batch):
            index = order[start:start + batch]
            with autocast:
                loss = model.loss(images[index], labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) * epochs / (time.perf_counter() - started)


def run(ctx: Context) -> list[Figure]:
    import torch
    import yaml

    from benchmarks.common import ROOT
    from detector.networks import build

    from benchmarks.common import SCRATCH_DEFAULTS
    from tests.scratch import deep_update

    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), SCRATCH_DEFAULTS)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, channels = params["preprocess"]["image_size"], params["preprocess"]["channels"]
    count = 256 if ctx.quick else (8192 if cuda else 1024)
    epochs = 1 if ctx.quick else (5 if cuda else 2)
    batch = params["train"]["batch_size"] * (4 if cuda else 1)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, channels, size, size, generator=generator).to(device)
    labels = (torch.rand(count, generator=generator) < 0.1).float().to(device)
    spec = {"family": params["model"]["type"], "channels": channels, "image_size": size,
            "width": params["model"]["width"], "latent_dim": params["model"]["latent_dim"],
            "eta": params["train"]["eta"]}

    def fresh():
        torch.manual_seed(0)
        model = build(spec).to(device)
        if hasattr(model, "init_center"):
            model.init_center(images[i:i + batch] for i in range(0, len(images), batch))
        model.train()
        return model, torch.optim.Adam(model.parameters(), lr=params["train"]["learning_rate"])

    _epochs(*fresh(), images, labels, batch, 1, device, bf16=True)  # warm-up: kernels, allocator
    fp32, bf16, use32, use16 = [], [], [], []
    for _ in range(ctx.repeats):
        for precision, rates, use in ((False, fp32, use32), (True, bf16, use16)):
            with _Utilisation() as utilisation:
                rates.append(_epochs(*fresh(), images, labels, batch, epochs, device, bf16=precision))
            if utilisation.samples:
                use.append(sum(utilisation.samples) / len(utilisation.samples))
    where = torch.cuda.get_device_name(0) if cuda else "CPU (no GPU on this machine)"
    note = f"{where}, {spec['family']} {channels}x{size}x{size}, batch {batch}, {count} images x {epochs} epochs"
    figures = [
        Figure("gpu.fp32_samples_per_s", "fp32", "samples/s", fp32, note=note, higher_is_better=True),
        Figure("gpu.bf16_samples_per_s", "bf16 autocast", "samples/s", bf16, higher_is_better=True),
        Figure("gpu.bf16_speedup", "bf16 / fp32", "ratio", ratios(bf16, fp32), higher_is_better=True),
    ]
    if use32 or use16:
        figures += [Figure("gpu.utilisation_fp32", "GPU utilisation, fp32", "%", use32),
                    Figure("gpu.utilisation_bf16", "GPU utilisation, bf16", "%", use16)]
    return figures
