"""preprocess: every validated item once into the arrays the model trains on, one .npy per
split (uint8 images, or float32 encoded rows for a table), and processed/index.parquet, which
numbers each split's items by ``row``.

Training memory-maps these arrays, so nothing is decoded or encoded per epoch. The split
comes from the manifest (a function of each item's content hash or key). How an item becomes
a row is the data kind's (pipeline/kinds/): images are decoded through a cache shared across
runs (pipeline/decoded_cache.py), tables are encoded with a transform fitted on the training
rows. Either way the output folder appears whole or not at all.
"""
from __future__ import annotations

from pipeline.kinds import kind_of
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    return kind_of(layout.config).preprocess(layout)
