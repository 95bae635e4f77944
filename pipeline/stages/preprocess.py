"""preprocess: decode, convert, resize once into uint8 arrays, one .npy per split.

Training memory-maps these arrays, so no PNG is decoded per epoch. The split comes
from the manifest (a function of each file's content hash).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from components.images import decode_to_array
from pipeline.io import StageError, atomic_path
from pipeline.layout import Layout

SPLITS = ("train", "calibration", "test")


def run(layout: Layout) -> dict:
    config = layout.config
    size, channels = config.preprocess.image_size, config.preprocess.channels
    manifest = pd.read_parquet(layout.manifest)
    manifest = manifest[manifest["decode_ok"]].sort_values("path", kind="stable")
    layout.processed.mkdir(parents=True, exist_ok=True)
    index_parts, counts = [], {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise StageError(f"the {split} split is empty: add images or change preprocess.split")
        target = layout.split_images(split)
        tmp = target.with_name(f".{target.name}.tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(rows), channels, size, size))
        try:
            for position, relpath in enumerate(rows["path"]):
                array[position] = decode_to_array((layout.raw / relpath).read_bytes(), size, channels)
            array.flush()
            del array
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        part = rows[["path", "batch", "label", "is_anomaly", "sha256", "split"]].copy()
        part["row"] = np.arange(len(rows))
        index_parts.append(part)
        counts[split] = {"images": len(rows), "anomalies": int(rows["is_anomaly"].sum())}
    with atomic_path(layout.index) as tmp:
        pd.concat(index_parts, ignore_index=True).to_parquet(tmp, index=False)
    print("preprocess: " + ", ".join(f"{s} {c['images']} ({c['anomalies']} anomalies)" for s, c in counts.items())
          + f" at {channels}x{size}x{size}")
    return counts
