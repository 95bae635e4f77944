"""An anomaly map as the served model returns it: a grey PNG, 128 = the threshold."""
from __future__ import annotations

import io

import numpy as np


THRESHOLD_LEVEL = 128


def to_levels(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Map values -> uint8 levels, the threshold at 128 (a threshold <= 0 is taken as tiny)."""
    scale = THRESHOLD_LEVEL / max(float(threshold), 1e-12)
    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float64), nan=np.inf, posinf=np.inf, neginf=0.0)
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)  # NaN shows as hot, never as normal


def encode_png(anomaly_map: np.ndarray, threshold: float) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_levels(anomaly_map, threshold), mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes, threshold: float) -> np.ndarray:
    """The map back from its PNG, in score units (saturated at twice the threshold)."""
    from PIL import Image

    # PNG only: these are the model's own maps, and no other decoder need see what is passed here
    levels = np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]), dtype=np.float64)
    return levels * max(float(threshold), 1e-12) / THRESHOLD_LEVEL
