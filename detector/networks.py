"""The three detector families, as small convolutional networks for images and as
MLPs for encoded table rows (data.kind table).

All of them map a batch of images (float in [0, 1], N x C x S x S), or of encoded rows
(float, N x features), to one anomaly score per item, higher meaning more anomalous, through ``score``. Everything a
model needs to be rebuilt is in its ``spec`` (a plain dict stored beside the weights).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from detector.backbones import FEATURE_FAMILIES

FAMILIES = ("autoencoder", "deep_sad", "classifier")


def _encoder(channels: int, width: int, bias: bool) -> nn.Sequential:
    """Three stride-2 conv blocks: S -> S/8, channels -> 4*width."""
    layers: list[nn.Module] = []
    c_in = channels
    for c_out in (width, width * 2, width * 4):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=bias),
            nn.BatchNorm2d(c_out, affine=bias),
            nn.LeakyReLU(0.1),
        ]
        c_in = c_out
    return nn.Sequential(*layers)


class _Reconstruction(nn.Module):
    """An autoencoder's loss: the reconstruction error of a batch's normal items only."""

    # its loss (and so its BatchNorm statistics) is over a batch's normal items only: how
    # multi-process training (components/training.py) weighs each process's share
    loss_over_normal_only = True

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        normal = y < 0.5
        if not bool(normal.any()):
            return x.sum() * 0.0
        x = x[normal]
        return F.mse_loss(self(x), x)


class ConvAutoencoder(_Reconstruction):
    """Unsupervised: trained on normal images; scored by local reconstruction error.

    The score is the mean of the largest values of a blurred per-pixel error map,
    because a defect is small: averaging the error over the whole image would
    drown a scratch in the texture's ordinary reconstruction noise.
    """

    def __init__(self, channels: int, image_size: int, width: int, latent_dim: int, top_fraction: float = 0.01):
        super().__init__()
        self.top_fraction = top_fraction
        self.encoder = _encoder(channels, width, bias=True)
        side = image_size // 8
        self.to_latent = nn.Linear(width * 4 * side * side, latent_dim)
        self.from_latent = nn.Linear(latent_dim, width * 4 * side * side)
        self.side, self.width = side, width
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(width * 4, width * 2, 4, stride=2, padding=1), nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(width * 2, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.to_latent(self.encoder(x).flatten(1))
        h = self.from_latent(z).view(-1, self.width * 4, self.side, self.side)
        return self.decoder(h)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        error = (self(x) - x).pow(2).mean(dim=1, keepdim=True)
        error = F.avg_pool2d(error, 5, stride=1, padding=2)
        flat = error.flatten(1)
        k = max(1, int(flat.shape[1] * self.top_fraction))
        return flat.topk(k, dim=1).values.mean(dim=1)


class DeepSAD(nn.Module):
    """Semi-supervised (Ruff et al., 2020): normal images pulled to a centre c,
    labelled anomalies pushed away by an inverse-distance term weighted by eta.
    With no labelled anomalies this is exactly Deep SVDD. The network has no
    bias terms, so the trivial solution (map everything onto c) is not available.
    """

    def __init__(self, channels: int, image_size: int, width: int, latent_dim: int, eta: float = 1.0):
        super().__init__()
        self.eta = eta
        self.encoder = _encoder(channels, width, bias=False)
        # max over positions keeps a small defect's response (see CNNClassifier)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.project = nn.Linear(width * 4, latent_dim, bias=False)
        self.register_buffer("center", torch.zeros(latent_dim))
        self.register_buffer("center_set", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(self.encoder(x)).flatten(1))

    @torch.no_grad()
    def init_center(self, normal_batches, eps: float = 0.1) -> None:
        """c = mean embedding of normal training images before training; near-zero
        coordinates are pushed to +-eps so that no unit can trivially match c."""
        total, count = None, 0
        for x in normal_batches:
            z = self(x).sum(dim=0)
            total = z if total is None else total + z
            count += x.shape[0]
        center = total / max(count, 1)
        center[(center.abs() < eps) & (center < 0)] = -eps
        center[(center.abs() < eps) & (center >= 0)] = eps
        self.center.copy_(center)
        self.center_set.fill_(True)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        return (self(x) - self.center).pow(2).sum(dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dist = self.distance(x)
        per_item = torch.where(y > 0.5, self.eta * (dist + 1e-6).reciprocal(), dist)
        return per_item.mean()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.distance(x)


class CNNClassifier(nn.Module):
    """Supervised: binary normal/anomaly with the positive class weighted by the
    imbalance. It only knows the defects it was shown; the score is the logit."""

    def __init__(self, channels: int, image_size: int, width: int, latent_dim: int, pos_weight: float = 1.0):
        super().__init__()
        self.encoder = _encoder(channels, width, bias=True)
        # max pooling, not average: a defect covers a few feature-map cells, and averaging
        # over the whole surface would wash it out
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width * 4, latent_dim),
                                  nn.LeakyReLU(0.1), nn.Linear(latent_dim, 1))
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(x), y, pos_weight=self.pos_weight)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _mlp(sizes: list[int], bias: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class MLPAutoencoder(_Reconstruction):
    """Unsupervised, for encoded rows (data.kind table): trained on normal rows, scored by the
    mean squared reconstruction error. The bottleneck is at most half the input's width:
    one-hot blocks make the encoded rows lower-dimensional than their width, and a bottleneck
    just under the width could still copy its input and score everything alike."""

    def __init__(self, features: int, width: int, latent_dim: int):
        super().__init__()
        hidden, bottleneck = 2 * width, max(1, min(latent_dim, features // 2))
        self.encoder = _mlp([features, hidden, bottleneck], bias=True)
        self.decoder = _mlp([bottleneck, hidden, features], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.leaky_relu(self.encoder(x), 0.1))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return (self(x) - x).pow(2).mean(dim=1)


class MLPDeepSAD(DeepSAD):
    """Deep SAD on encoded rows: a bias-free MLP encoder (no bias, so no trivial map onto c)."""

    def __init__(self, features: int, width: int, latent_dim: int, eta: float = 1.0):
        nn.Module.__init__(self)
        self.eta = eta
        self.net = _mlp([features, 2 * width, width, latent_dim], bias=False)
        self.register_buffer("center", torch.zeros(latent_dim))
        self.register_buffer("center_set", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPClassifier(nn.Module):
    """Supervised on encoded rows: the positive class weighted by the imbalance; the score is the logit."""

    def __init__(self, features: int, width: int, latent_dim: int, pos_weight: float = 1.0):
        super().__init__()
        self.net = _mlp([features, 2 * width, width, 1], bias=True)
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self(x), y, pos_weight=self.pos_weight)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _build_table(spec: dict[str, Any]) -> nn.Module:
    family = spec["family"]
    common = dict(features=spec["features"], width=spec["width"], latent_dim=spec["latent_dim"])
    if family == "autoencoder":
        return MLPAutoencoder(**common)
    if family == "deep_sad":
        return MLPDeepSAD(**common, eta=spec.get("eta", 1.0))
    if family == "classifier":
        return MLPClassifier(**common, pos_weight=spec.get("pos_weight", 1.0))
    raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")


def build(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its spec: family, channels, image_size, width, latent_dim (+ family
    options); with ``input: table``, features instead of channels and image_size (an MLP)."""
    if spec.get("input") == "table":
        return _build_table(spec)
    family = spec["family"]
    if family in FEATURE_FAMILIES:  # the backbone's weights come with the state dict loaded after this
        from detector.feature_detectors import build as build_feature_detector

        return build_feature_detector(spec)
    common = dict(channels=spec["channels"], image_size=spec["image_size"], width=spec["width"],
                  latent_dim=spec["latent_dim"])
    if family == "autoencoder":
        model: nn.Module = ConvAutoencoder(**common)
    elif family == "deep_sad":
        model = DeepSAD(**common, eta=spec.get("eta", 1.0))
    elif family == "classifier":
        model = CNNClassifier(**common, pos_weight=spec.get("pos_weight", 1.0))
    else:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    # Channels-last weights make the convolutions run in NHWC, which oneDNN's CPU kernels (and
    # CUDA's tensor cores) are faster at: training took 13-27 % more samples/s here than with
    # the default layout, depending on the family (benchmarks/README.md). Inputs can stay NCHW
    # (a convolution follows its weight's layout). The kernels differ, so results differ in
    # float rounding from the default layout's, and are as deterministic.
    return model.to(memory_format=torch.channels_last)
