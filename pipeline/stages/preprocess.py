"""preprocess: decode, convert, resize once into uint8 arrays, one .npy per split.

Training memory-maps these arrays, so no PNG is decoded per epoch. The split comes
from the manifest (a function of each file's content hash).

The whole output folder is written under a temporary name and renamed into place
only when every file in it is complete, so a stage that runs out of disk (or finds
its folder unwritable) leaves nothing under the name the next stage reads; the error
says which file, and why, in one line.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from components.images import DecodeLimits, ImageDecodeError, decode_to_array
from pipeline.config import Config
from pipeline.io import DataError, StageError, atomic_path
from pipeline.layout import Layout

SPLITS = ("train", "calibration", "test")

# OSErrors of a write that running again with the same disk cannot fix; said in words
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file size limit (a full or size-capped disk, or ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way of a folder of that name",
}


def decode_limits(config: Config) -> DecodeLimits:
    """The decoding limits of params (preprocess.max_pixels, preprocess.max_bytes)."""
    return DecodeLimits(max_pixels=config.preprocess.max_pixels, max_bytes=config.preprocess.max_bytes)


def _write_split(target: Path, paths: list[Path], size: int, channels: int, limits: DecodeLimits) -> None:
    array = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(paths), channels, size, size))
    if hasattr(os, "posix_fallocate"):
        # reserve every block now: a memory-mapped write to a full disk would kill the
        # process with SIGBUS half-way instead of raising ENOSPC here
        with open(target, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    for position, path in enumerate(paths):
        try:
            data = path.read_bytes()
        except OSError as error:
            raise StageError(f"preprocess: cannot read {path}: {error.strerror or error}") from error
        try:
            array[position] = decode_to_array(data, size, channels, limits)
        except ImageDecodeError as error:  # validation passed it under other limits or other bytes
            raise DataError(f"preprocess: {path}: {error}") from None
    array.flush()
    del array


def _cannot_write(error: OSError, layout: Layout, writing: Path) -> StageError:
    def shown(path: Path) -> str:
        try:
            return Path(path).relative_to(layout.root).as_posix()
        except ValueError:
            return str(path)

    why = WRITE_FAILURES[error.errno]
    fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
    return StageError(f"preprocess: cannot write {shown(writing)}: {why} ([Errno {error.errno}] {error.strerror}"
                      f"{': ' + shown(error.filename) if error.filename else ''}); nothing was written under "
                      f"{shown(layout.processed)}; {fix}, then run the stage again")


def run(layout: Layout) -> dict:
    config = layout.config
    size, channels = config.preprocess.image_size, config.preprocess.channels
    limits = decode_limits(config)
    manifest = pd.read_parquet(layout.manifest)
    manifest = manifest[manifest["decode_ok"]].sort_values("path", kind="stable")
    split_rows = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split].reset_index(drop=True)
        if rows.empty:
            raise StageError(f"the {split} split is empty: add images or change preprocess.split")
        split_rows[split] = rows

    index_parts, counts = [], {}
    writing = layout.processed
    try:
        with atomic_path(layout.processed) as staging:
            staging.mkdir()
            for split, rows in split_rows.items():
                writing = layout.split_images(split)
                _write_split(staging / writing.relative_to(layout.processed),
                             [layout.raw / relpath for relpath in rows["path"]], size, channels, limits)
                part = rows[["path", "batch", "label", "is_anomaly", "sha256", "split"]].copy()
                part["row"] = np.arange(len(rows))
                index_parts.append(part)
                counts[split] = {"images": len(rows), "anomalies": int(rows["is_anomaly"].sum())}
            writing = layout.index
            buffer = io.BytesIO()  # Python's own write below raises an OSError with its errno
            pd.concat(index_parts, ignore_index=True).to_parquet(buffer, index=False)
            (staging / writing.relative_to(layout.processed)).write_bytes(buffer.getvalue())
            writing = layout.processed
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise _cannot_write(error, layout, writing) from error
    print("preprocess: " + ", ".join(f"{s} {c['images']} ({c['anomalies']} anomalies)" for s, c in counts.items())
          + f" at {channels}x{size}x{size}")
    return counts
