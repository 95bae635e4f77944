"""PaDiM (Defard et al., ICPR 2021) on anomalib's torch model: a Gaussian per feature-map
position over a random subset of the backbone's channels; a patch's score is its
Mahalanobis distance, an image's the largest value of the blurred map.

The Gaussian is accumulated batch by batch (sums and sums of outer products, in float64)
instead of stacking every embedding as anomalib's ``fit`` does, so the fit's memory does not
grow with the number of images; mean and covariance (with anomalib's 0.01 I + 1e-5 I
regularisation) are the same quantities.
"""
from __future__ import annotations

from typing import Any

import torch

from detector.backbones import LAYER_CHANNELS
from detector.feature_detectors import FeatureDetector, import_quietly, resolve_layers

# channels drawn at random from the layers' concatenation (at most all of them); anomalib's
# defaults for the ResNets, and for lite0 (176 channels in blocks 1, 2 and 4) resnet18's
N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550, "efficientnet_lite0": 100}


class Padim(FeatureDetector):
    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        PadimModel = import_quietly("anomalib.models.image.padim.torch_model").PadimModel

        layers = resolve_layers("padim", spec["backbone"], spec.get("layers"))
        available = sum(LAYER_CHANNELS[spec["backbone"]][layer] for layer in layers)
        n_features = min(int(spec.get("n_features") or N_FEATURES[spec["backbone"]]), available)
        # the channel draw (a buffer, idx) uses torch's global generator: fit() seeded it
        self.inner = PadimModel(backbone=self.arch, layers=layers, pre_trained=False,
                                n_features=n_features)
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._count = 0

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.generate_embedding(self.features(x))

    def begin_fit(self, images: int) -> None:
        self._sum, self._outer, self._count = None, None, 0

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        embedding = self._embed(x)
        batch, channels, height, width = embedding.shape
        vectors = embedding.reshape(batch, channels, height * width).double()
        if self._sum is None:
            self._sum = torch.zeros(channels, height * width, dtype=torch.float64, device=vectors.device)
            self._outer = torch.zeros(height * width, channels, channels, dtype=torch.float64, device=vectors.device)
        self._sum += vectors.sum(0)
        self._outer += torch.einsum("bip,bjp->pij", vectors, vectors)
        self._count += batch

    def end_fit(self) -> dict[str, Any]:
        n = self._count
        if n < 2:
            raise ValueError("padim needs at least 2 normal training images to estimate a covariance")
        mean = self._sum / n                                          # C x P
        centred = self._outer - n * torch.einsum("ip,jp->pij", mean, mean)
        identity = torch.eye(mean.shape[0], dtype=torch.float64, device=mean.device)
        covariance = centred / (n - 1) + 0.01 * identity + 1e-5 * identity
        self.inner.gaussian.mean = mean.float()
        self.inner.gaussian.inv_covariance = torch.linalg.inv(covariance).float()
        self._sum = self._outer = None
        positions = int(mean.shape[1])
        return {"positions": positions, "feature_dim": int(mean.shape[0]), "bank_size": positions}

    def score_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = self.inner.anomaly_map_generator(
            embedding=self._embed(x), mean=self.inner.gaussian.mean,
            inv_covariance=self.inner.gaussian.inv_covariance, image_size=x.shape[-2:])
        return torch.amax(anomaly_map, dim=(-2, -1)).flatten(), anomaly_map[:, 0]
