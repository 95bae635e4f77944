"""Images as feature vectors, for validate's drift test (components/drift.py).

Every image gets fixed pixel statistics, an 8 x 8 thumbnail and a 16-bin histogram per channel,
and, where weights allow, a pretrained backbone's features next to them:

* the model's own backbone (``model.backbone`` with ``model.backbone_weights``, the model's
  layers) when the model is a feature family (PatchCore, PaDiM): the test then also looks at the
  images the way the detector will;
* otherwise EfficientNet-Lite0 with the ImageNet weights its package ships, when installed. A
  family trained from scratch has no encoder yet when validate runs (it is trained later, on this
  very data), and the champion's would mean loading a model from the registry in a data check;
* otherwise (no weights installed, weights that cannot be read (train refuses those, saying why), or
  ``model.backbone_weights: none``, whose random weights would make another embedding each run)
  the pixel statistics alone.

Why the pixels always: ImageNet features are trained to ignore lighting. On the synthetic line
(components/synthetic.py, 40 normal images a side, 5 seeds), normal images 15 % brighter went
unnoticed in Lite0's features alone (p-values 0.014 to 0.33) and were found every time with the
pixel statistics beside them (p = 0.002, the smallest 499 permutations give). The backbone adds
what pixels miss: texture and structure (a new surface, a new supplier's part).

A backbone's feature maps are summarised by their mean and standard deviation over positions, per
channel. It runs on the CPU in batches, on small images (validate decodes them at ``SIZE``
pixels): drift of a whole batch shows at that size, and the check stays a small part of validate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIZE = 64            # pixels a side the images are decoded at for the embedding
BATCH = 64           # images per forward pass of the backbone
THUMBNAIL = 8        # the pixel statistics' thumbnail: 8 x 8 per channel
HISTOGRAM_BINS = 16  # the pixel statistics' histogram bins per channel
PIXELS = f"{THUMBNAIL}x{THUMBNAIL} thumbnail and {HISTOGRAM_BINS}-bin histogram per channel"


@dataclass
class FeatureSpace:
    description: str                 # what the report says the images were compared in
    network: Any = field(default=None, repr=False)  # a timm features_only model (the layers used), or None: pixels
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def feature_space(family: str, backbone: str, weights: str, layers: list[str] | None) -> FeatureSpace:
    """The feature space for a model config: see the module's docstring for the choice."""
    from detector.backbones import FEATURE_FAMILIES, BackboneWeightsError, packaged_weights

    candidates = [(family, backbone, weights, layers)] if family in FEATURE_FAMILIES and weights != "none" else []
    if packaged_weights("efficientnet_lite0") is not None:
        candidates.append(("patchcore", "efficientnet_lite0", "auto", None))
    for candidate in candidates:
        try:
            return _backbone_space(*candidate)
        except BackboneWeightsError:  # train refuses the model's with this message; validate checks data
            continue
    return FeatureSpace(f"{PIXELS} at {SIZE} px (no usable backbone weights)")


def _backbone_space(family: str, backbone: str, weights: str, layers: list[str] | None) -> FeatureSpace:
    import timm
    import torch

    from detector.backbones import LAYERS, apply_weights, resolve_weights
    from detector.feature_detectors import drop_unused_blocks, resolve_layers

    resolved = resolve_weights(backbone, weights)
    layers = resolve_layers(family, backbone, layers)
    network = timm.create_model(resolved.arch, pretrained=False, features_only=True,
                                out_indices=[LAYERS[backbone].index(layer) for layer in layers])
    apply_weights(network, resolved, backbone)
    drop_unused_blocks(network)  # the blocks past the deepest layer used were most of the time
    network.to(memory_format=torch.channels_last)  # oneDNN's CPU convolutions: faster in NHWC, as in training
    network.eval()
    return FeatureSpace(f"{backbone} ({resolved.info.source}) {'+'.join(layers)} mean and sd per channel, and "
                        f"{PIXELS}, at {SIZE} px", network, resolved.mean, resolved.std)


def embed_pair(before: np.ndarray, now: np.ndarray, space: FeatureSpace) -> tuple[np.ndarray, np.ndarray]:
    """Two samples of uint8 images (N x C x SIZE x SIZE, C 1 or 3) as float64 vectors in ``space``.

    Each block of features (the backbone's, the pixels') is standardised on the two samples
    pooled, and weighted by one over the square root of its width, so that neither block's
    scale decides the kernel's. Pooled, the scaling is the same whichever way the items are
    split between the samples: the permutation test's p-value stays exact."""
    blocks = [_pixels] + ([lambda images: _backbone(images, space)] if space.network is not None else [])
    sides: list[list[np.ndarray]] = [[], []]
    for block in blocks:
        a, b = block(before), block(now)
        pooled = np.concatenate([a, b])
        mean, sd = pooled.mean(axis=0), pooled.std(axis=0)
        sd[sd == 0] = 1.0  # a feature equal on every image carries nothing
        sides[0].append((a - mean) / sd / np.sqrt(a.shape[1]))
        sides[1].append((b - mean) / sd / np.sqrt(a.shape[1]))
    return np.concatenate(sides[0], axis=1), np.concatenate(sides[1], axis=1)


def _backbone(images: np.ndarray, space: FeatureSpace) -> np.ndarray:
    import torch

    from detector.backbones import backbone_input

    vectors = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            x = torch.from_numpy(images[start:start + BATCH]).float() / 255.0
            maps = space.network(backbone_input(x, space.mean, space.std))
            vectors.append(torch.cat([torch.cat([m.mean(dim=(2, 3)), m.std(dim=(2, 3))], dim=1) for m in maps],
                                     dim=1).double().numpy())
    return np.concatenate(vectors)


def _pixels(images: np.ndarray) -> np.ndarray:
    n, channels, size, _ = images.shape
    cell = size // THUMBNAIL
    scaled = images[:, :, :cell * THUMBNAIL, :cell * THUMBNAIL].astype(np.float64) / 255.0
    thumbnail = scaled.reshape(n, channels, THUMBNAIL, cell, THUMBNAIL, cell).mean(axis=(3, 5)).reshape(n, -1)
    bins = np.minimum(images.reshape(n, channels, -1).astype(np.int64) * HISTOGRAM_BINS // 256, HISTOGRAM_BINS - 1)
    histogram = np.stack([np.stack([np.bincount(row, minlength=HISTOGRAM_BINS) for row in image]) for image in bins])
    return np.concatenate([thumbnail, histogram.reshape(n, -1) / bins.shape[2]], axis=1)
