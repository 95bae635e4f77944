"""The rules shared by what the pipeline keeps in the DVC cache folder: how it is switched off,
how a run says it used a folder, and when a folder no run uses is removed.

preprocess's decoded-image cache (pipeline/decoded_cache.py) and validate's per-batch table
statistics (pipeline/table_stats.py) live in the DVC cache folder the workspace uses: every run
of a project shares them, and `dvc gc` leaves them alone. Both are keyed so that a change (a new
image size, a new pandas, a re-exported file) starts a new folder and leaves the old one behind,
and the table store keeps a folder for every batch it ever read, also once the batch has left
the drift window: nothing else would ever remove them. So each run marks the folders it uses
(a ``.used`` file, touched) and removes the ones no run has used for TTL_DAYS. A folder removed
while still wanted costs reading its data again, never a result: both caches are optimisations,
and a reader that finds its folder gone mid-read reads the source instead.

A folder is removed by renaming it out of the way first (``.expired.<id>``) and deleting it
after: a run marking it at that moment then marks the folder on its way out (or fails to find
it), and can never leave a half-deleted folder holding only a fresh mark under the old name,
which would block that entry from being stored again. A folder a run marked between the check
and the rename is put back."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

TTL_DAYS = 30           # a folder no run has used for this long is removed
MARK = ".used"          # touched by each run that uses the folder
GONE = ".expired."      # the prefix of a folder being removed; always removed
OFF = ("off", "0", "false", "no")


def switched_off(variable: str) -> bool:
    """Whether the environment variable ``variable`` turns a cache off (benchmarks, debugging)."""
    return os.environ.get(variable, "").strip().lower() in OFF


def mark_used(folder: Path) -> bool:
    """Says that a run used ``folder`` now; whether it could (not where the folder is missing,
    nor on a cache this user cannot write)."""
    try:
        (folder / MARK).touch()
        return True
    except OSError:
        return False


def last_used(folder: Path) -> float:
    """When a run last used ``folder``: its mark, or for one never marked (written before marks
    existed, or by a run killed before it marked it) the folder's own modification time."""
    try:
        return (folder / MARK).stat().st_mtime
    except FileNotFoundError:
        return folder.stat().st_mtime


def discard(folder: Path, unless_used_since: float | None = None) -> bool:
    """Removes ``folder``: renamed out of the way, then deleted; whether this call removed it
    (not where another run did first, nor where it cannot be renamed). With ``unless_used_since``,
    a folder that a run marked after that time (between the caller's check and the rename) is
    put back under its name instead."""
    away = folder.with_name(f"{GONE}{uuid.uuid4().hex}")
    try:
        os.rename(folder, away)
    except OSError:
        return False
    if unless_used_since is not None:
        try:
            if last_used(away) >= unless_used_since:
                os.rename(away, folder)
                return False
        except OSError:
            pass  # its name is taken again, or it is unreadable: removed after all
    shutil.rmtree(away, ignore_errors=True)
    return True


def remove_unused(root: Path, ttl_days: float = TTL_DAYS) -> list[str]:
    """Removes the folders directly under ``root`` that no run has used for ``ttl_days`` (and any
    left half-removed) and returns their names. Files and links are left alone; a folder that
    cannot be inspected or removed is skipped (another run may be removing it at the same moment)."""
    horizon = time.time() - ttl_days * 86400
    try:
        children = list(os.scandir(root))
    except OSError:
        return []
    removed = []
    for child in children:
        try:
            if not child.is_dir(follow_symlinks=False):
                continue
            if child.name.startswith(GONE):
                shutil.rmtree(child.path, ignore_errors=True)
                continue
            if last_used(Path(child.path)) >= horizon:
                continue
        except OSError:
            continue
        if discard(Path(child.path), unless_used_since=horizon):
            removed.append(child.name)
    return removed
