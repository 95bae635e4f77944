"""Which split an item belongs to, for every data kind: a pure function of the item's hash
(an image's content hash, a record's key hash)."""
from __future__ import annotations


def split_of(digest: str, fractions: tuple[float, float, float]) -> str:
    """train | calibration | test, a pure function of the item's hash.

    A file keeps its split forever as new batches arrive, and identical content
    can never sit in two splits, so the test set never leaks into training.
    """
    position = int(digest[:12], 16) / float(16**12)
    train, calibration, _ = fractions
    if position < train:
        return "train"
    if position < train + calibration:
        return "calibration"
    return "test"
