"""Detectors on pretrained features (PatchCore, PaDiM): what they share.

They are not trained: one pass over the normal training images fills a memory bank
(PatchCore) or a per-position Gaussian (PaDiM) with features of an ImageNet-pretrained
backbone, and an image's score is how far its patches are from those. The torch models are
anomalib's (``anomalib.models.image.{patchcore,padim}.torch_model``); this module and the
two family modules are the thin adapter that fits them into ``train -> calibrate ->
evaluate -> register``:

* input: uint8 images as preprocess writes them, scaled to [0, 1] by
  ``training.to_tensor``, grey repeated to three channels and normalised as the weights were
  trained here (``backbones.backbone_input``), so the served model takes the same bytes as any family;
* scores: the torch models' raw scores (anomalib's Lightning post-processor, which
  normalises and clamps them, is not used: calibration and gates need the raw ranking);
* anomaly maps: ``score_and_map`` gives the per-pixel map at the input size;
* on CUDA the backbone runs under bf16 autocast; distances and Gaussians stay in fp32
  (a nearest-neighbour distance as ``|x|^2 - 2xy + |y|^2`` loses its digits in bf16);
* the fitted model's state dict holds everything (backbone, bank or Gaussian), so the
  served model needs no weights file and no network.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from detector.backbones import (BACKBONES, FEATURE_FAMILIES, IMAGENET_MEAN, IMAGENET_STD, apply_weights, backbone_input, resolve_weights)

log = logging.getLogger(__name__)

# the backbone under bf16 autocast on CUDA (benchmarks/feature_throughput.py measured it against
# fp32: scores and AUROC on a GPU in benchmarks/results-h200.md); a switch for that comparison, not a setting
BF16_ON_CUDA = True

# Layers per family and backbone when model.layers is null. EfficientNet-Lite0's were measured
# on the realistic set (benchmarks/surface_quality.py, GPU sweep in docs/detectors.md): at
# 224 px, PatchCore on blocks.2 alone (stride 8, 40 channels) had the best mean AUROC (0.794,
# against 0.757 for blocks.2+4, the analogue of the papers' layer2+3) and is the cheapest to
# fit; PaDiM on blocks.1+2 (0.753 against 0.722 for blocks.1+2+4). The ResNets keep the
# papers' choices (no ImageNet weights for them can be installed here to measure with).
DEFAULT_LAYERS: dict[str, dict[str, list[str]]] = {
    "patchcore": {"resnet18": ["layer2", "layer3"], "wide_resnet50_2": ["layer2", "layer3"],
                  "efficientnet_lite0": ["blocks.2"]},
    "padim": {"resnet18": ["layer1", "layer2", "layer3"], "wide_resnet50_2": ["layer1", "layer2", "layer3"],
              "efficientnet_lite0": ["blocks.1", "blocks.2"]},
}


class FeatureDetector(nn.Module):
    """Base of the two families: the backbone's features, a fit in three calls
    (``begin_fit``, ``add`` per batch, ``end_fit``), and scores with or without maps."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec
        self.mean = tuple(spec.get("input_mean", IMAGENET_MEAN))
        self.std = tuple(spec.get("input_std", IMAGENET_STD))
        self.arch = spec.get("arch", spec["backbone"])  # timm's architecture (the weights chose it)

    # the anomalib torch model; its feature_extractor.feature_extractor is timm's network
    inner: nn.Module

    @property
    def extractor(self) -> nn.Module:
        return self.inner.feature_extractor.feature_extractor

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's feature maps (fp32) of images in [0, 1]."""
        x = backbone_input(x, self.mean, self.std)
        with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                                               enabled=x.is_cuda and BF16_ON_CUDA):
            features = self.inner.feature_extractor(x)
        return {layer: value.float() for layer, value in features.items()}

    def begin_fit(self, images: int) -> None:
        raise NotImplementedError

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        raise NotImplementedError

    def end_fit(self) -> dict[str, Any]:
        """Finish the fit; returns what train.json reports (bank size, bytes, ...)."""
        raise NotImplementedError

    def score_and_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores N, anomaly maps N x H x W at the input's size), higher = more anomalous."""
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_and_map(x)[0]

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{self.spec['family']} is fitted in one pass, not trained with a loss")


def import_quietly(module: str):
    """Import an anomalib module without the two FutureWarnings its package import prints
    about its own deprecated modules (timm.models.layers, dinov2) into every stage log."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(module)


def resolve_layers(family: str, backbone: str, layers: list[str] | None) -> list[str]:
    return list(layers) if layers else list(DEFAULT_LAYERS[family][backbone])


def build(spec: dict[str, Any], load_weights: bool = False) -> FeatureDetector:
    """The family's module for ``spec``. With ``load_weights`` the backbone gets its
    ImageNet weights from ``spec['backbone_weights']``, and ``spec`` records what was loaded
    (``weights``), the architecture the weights need (``arch``) and their input
    normalisation; without, the backbone holds random weights that a state dict replaces
    (the served model, whose state dict carries the backbone)."""
    family, backbone = spec["family"], spec["backbone"]
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    resolved = None
    if load_weights:
        resolved = resolve_weights(backbone, spec.get("backbone_weights", "auto"))
        spec.update(arch=resolved.arch, input_mean=list(resolved.mean), input_std=list(resolved.std),
                    weights=resolved.info.as_dict())
    if family == "patchcore":
        from detector.patchcore import PatchCore

        model: FeatureDetector = PatchCore(spec)
    elif family == "padim":
        from detector.padim import Padim

        model = Padim(spec)
    else:
        raise ValueError(f"unknown feature family {family!r} (known: {', '.join(FEATURE_FAMILIES)})")
    if resolved is not None:
        apply_weights(model.extractor, resolved, backbone)
    drop_unused_blocks(model.extractor)
    # channels-last weights run the backbone's convolutions in NHWC, which oneDNN's CPU kernels
    # are faster at: lite0 at 224 px scored 1.4x faster here, with the same scores
    model.extractor.to(memory_format=torch.channels_last)
    model.eval()
    return model


def drop_unused_blocks(extractor: nn.Module) -> None:
    """timm's EfficientNet feature extractor runs all seven blocks whatever layers are asked for
    (``_stage_out_idx`` maps block number + 1 to an output); the blocks past the deepest one asked
    for only cost time and model size. ResNets' feature extractors stop at their last layer already."""
    blocks = getattr(extractor, "blocks", None)
    stages = getattr(extractor, "_stage_out_idx", None)
    if isinstance(blocks, nn.Sequential) and stages:
        extractor.blocks = blocks[:max(stages)]


