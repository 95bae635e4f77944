"""PatchCore (Roth et al., CVPR 2022) on anomalib's torch model: a memory bank of patch
features of normal images, reduced by greedy coreset selection; a patch's score is the
distance to its nearest bank entry, an image's the reweighted largest patch score.

Bounded fit: ``model.max_bank`` caps the bank, and with it the memory and time of the
fit. Where the cap binds, the patches are first drawn at random (seeded) down to
``max_bank / coreset_ratio``, the pool from which ``coreset_ratio`` would give exactly the
cap; below it every patch is kept, exactly as anomalib fits. Coreset selection costs
pool x bank distance evaluations, so the cap is what keeps a 50k-image night in minutes.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch

from detector.feature_detectors import FeatureDetector, import_quietly, resolve_layers


def _coreset(pool: torch.Tensor, ratio: float) -> torch.Tensor:
    """anomalib's k-center-greedy coreset (``KCenterGreedy``), with two changes that make it
    cheaper on a CPU and no less exact:

    * each step's differences to the new centre go into a buffer allocated once. anomalib
      allocates a pool-sized tensor per step, and on this machine every one was faulted in
      anew (3.7 million page faults and 24 s for a 15k-patch pool, against under a second);
    * the random projection is skipped where it would not make the features smaller. It
      projects to the Johnson-Lindenstrauss dimension for eps 0.9 (about 24 ln n: 290 for
      150k patches), which is more than EfficientNet-Lite0's 40 to 152 channels: the projection
      then costs time per step and only blurs the distances. For wide backbones (1,536
      channels for wide_resnet50_2) it projects as anomalib does.

    Each step is one pass over the pool, so the selection costs pool x bank x dims: what
    ``model.max_bank`` bounds."""
    KCenterGreedy = import_quietly("anomalib.models.components").KCenterGreedy

    class _Identity:
        def fit(self, embedding: torch.Tensor) -> "_Identity":
            return self

        def transform(self, embedding: torch.Tensor) -> torch.Tensor:
            return embedding

    class BufferedKCenterGreedy(KCenterGreedy):
        def __init__(self, embedding: torch.Tensor, sampling_ratio: float) -> None:
            super().__init__(embedding, sampling_ratio)
            dims = self.model._johnson_lindenstrauss_min_dim(n_samples=embedding.shape[0], eps=self.model.eps)
            if dims >= embedding.shape[1]:
                self.model = _Identity()

        def update_distances(self, cluster_center) -> None:
            if cluster_center is None:
                return
            if getattr(self, "_buffer", None) is None:
                self._buffer = torch.empty_like(self.features)
            torch.sub(self.features, self.features[cluster_center], out=self._buffer)
            distances = torch.linalg.norm(self._buffer, ord=2, dim=1, keepdim=True)
            self.min_distances = (distances if self.min_distances is None
                                  else torch.minimum(self.min_distances, distances))

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar: thousands of updates in the log
        return BufferedKCenterGreedy(embedding=pool, sampling_ratio=ratio).sample_coreset()


class PatchCore(FeatureDetector):
    def __init__(self, spec: dict[str, Any]):
        super().__init__(spec)
        PatchcoreModel = import_quietly("anomalib.models.image.patchcore.torch_model").PatchcoreModel

        layers = resolve_layers("patchcore", spec["backbone"], spec.get("layers"))
        self.inner = PatchcoreModel(layers=layers, backbone=self.arch, pre_trained=False,
                                    num_neighbors=int(spec.get("num_neighbors", 9)))
        self.coreset_ratio = float(spec.get("coreset_ratio", 0.1))
        self.max_bank = int(spec.get("max_bank", 10_000))
        self._pool: list[torch.Tensor] = []
        self._keep = 1.0
        self._images = 0
        self._total = 0

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        features = {layer: self.inner.feature_pooler(value) for layer, value in self.features(x).items()}
        embedding = self.inner.generate_embedding(features)
        batch, _, height, width = embedding.shape
        return self.inner.reshape_embedding(embedding), (batch, height, width)

    def _bank_size(self, total: int) -> int:
        return max(1, min(int(self.coreset_ratio * total), self.max_bank, total))  # anomalib's int(n * ratio)

    def begin_fit(self, images: int) -> None:
        self._pool, self._images, self._keep, self._total = [], images, 1.0, 0

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        flat, (batch, height, width) = self._embed(x)
        if self._total == 0:  # the first batch tells the patches per image, so the pool's share
            total = self._images * height * width
            pool = min(total, math.ceil(self._bank_size(total) / self.coreset_ratio))
            self._keep = pool / total
        self._total += flat.shape[0]
        if self._keep < 1.0:
            take = max(1, round(self._keep * flat.shape[0]))
            chosen = torch.randperm(flat.shape[0], generator=generator)[:take].sort().values
            flat = flat[chosen.to(flat.device)]
        self._pool.append(flat)

    def end_fit(self) -> dict[str, Any]:
        pool = torch.vstack(self._pool)
        self._pool, pooled = [], int(pool.shape[0])
        bank = min(self._bank_size(self._total), pooled)
        if bank < pooled:
            # KCenterGreedy takes int(n * ratio): nudge the ratio so that it lands on `bank`
            ratio = min(1.0, (bank + 0.5) / pooled)
            pool = _coreset(pool, ratio)
        self.inner.memory_bank = pool.contiguous()
        return {"patches": int(self._total), "pool": pooled,
                "bank_size": int(self.inner.memory_bank.shape[0]), "feature_dim": int(pool.shape[1])}

    def _patch_scores(self, x: torch.Tensor):
        flat, (batch, height, width) = self._embed(x)
        patch_scores, locations = self.inner.nearest_neighbors(embedding=flat, n_neighbors=1)
        patch_scores, locations = patch_scores.reshape(batch, -1), locations.reshape(batch, -1)
        scores = self.inner.compute_anomaly_score(patch_scores, locations, flat)
        return scores, patch_scores.reshape(batch, 1, height, width)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self._patch_scores(x)[0]  # no map: the served model's default path stays lean

    def score_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, patches = self._patch_scores(x)
        return scores, self.inner.anomaly_map_generator(patches, x.shape[-2:])[:, 0]
