"""Ageing a cache folder for the expiry tests (pipeline/caches.py), without waiting 30 days."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.caches import MARK


def last_used_days_ago(folder: Path, days: float) -> None:
    """Makes ``folder`` look last used ``days`` ago: its mark, if it has one, and the folder
    itself (links are aged, not what they point to)."""
    then = time.time() - days * 86400
    for path in (folder / MARK, folder):
        if os.path.lexists(path):
            os.utime(path, (then, then), follow_symlinks=False)
