"""How long what the pipeline keeps in the DVC cache folder lives.

preprocess's decoded-image cache (pipeline/decoded_cache.py) and validate's per-batch table
statistics (pipeline/table_stats.py) live in the DVC cache folder the workspace uses: every run
of a project shares them, and `dvc gc` leaves them alone. Both are keyed so that a change (a new
image size, a new pandas, a batch that left the drift window) starts a new folder and leaves the
old one behind, and nothing else would ever remove it. So each run marks the folders it used
(a ``.used`` file, touched) and removes the ones no run has used for TTL_DAYS. A folder removed
while still wanted costs reading its data again, never a result: both caches are optimisations,
and a reader that finds its folder gone mid-read reads the source instead."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

TTL_DAYS = 30     # a folder no run has used for this long is removed
MARK = ".used"    # touched by each run that uses the folder


def mark_used(folder: Path) -> None:
    """Says that a run used ``folder`` now. Raises OSError (a read-only cache): the caller
    decides whether that matters."""
    (folder / MARK).touch()


def last_used(folder: Path) -> float:
    """When a run last used ``folder``: its mark, or for one never marked (written before marks
    existed, or by a run killed before it marked it) the folder's own modification time."""
    marker = folder / MARK
    try:
        return marker.stat().st_mtime
    except FileNotFoundError:
        return folder.stat().st_mtime


def remove_unused(root: Path, ttl_days: float = TTL_DAYS) -> list[str]:
    """Removes the folders directly under ``root`` that no run has used for ``ttl_days`` and
    returns their names. Files and links are left alone; a folder that cannot be inspected or
    removed is skipped (another run may be removing it at the same moment)."""
    horizon = time.time() - ttl_days * 86400
    try:
        children = list(os.scandir(root))
    except OSError:
        return []
    removed = []
    for child in children:
        try:
            if not child.is_dir(follow_symlinks=False) or last_used(Path(child.path)) >= horizon:
                continue
        except OSError:
            continue
        shutil.rmtree(child.path, ignore_errors=True)
        if not os.path.lexists(child.path):
            removed.append(child.name)
    return removed
