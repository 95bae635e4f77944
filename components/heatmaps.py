"""Anomaly maps as pictures: the served model's ``anomaly_map`` PNG and evaluate's overlays.

The PNG is 8-bit grey at the model's input size, scaled against the model's threshold so
that a reader needs nothing else to interpret it: 0 is a score of 0, **128 is the
threshold**, 255 is twice the threshold or more. A pixel above 128 is where the model saw
something it would flag.
"""
from __future__ import annotations

import numpy as np

from detector.heatmaps import THRESHOLD_LEVEL, to_levels


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, title: str, path) -> None:
    """image (uint8 C x H x W) beside itself with the map on top (inferno, threshold marked
    by a contour), saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picture = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    cmap = "gray" if image.shape[0] == 1 else None
    levels = to_levels(anomaly_map, threshold)
    fig, axes = plt.subplots(1, 2, figsize=(5.2, 2.8))
    axes[0].imshow(picture, cmap=cmap, vmin=0, vmax=255)
    axes[1].imshow(picture, cmap=cmap, vmin=0, vmax=255)
    axes[1].imshow(levels, cmap="inferno", vmin=0, vmax=255, alpha=0.5)
    if (levels > THRESHOLD_LEVEL).any() and (levels <= THRESHOLD_LEVEL).any():
        axes[1].contour(levels, levels=[THRESHOLD_LEVEL], colors="cyan", linewidths=0.8)
    for axis in axes:
        axis.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
