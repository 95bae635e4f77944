"""pipeline/cache_expiry.py: what the pipeline keeps in the DVC cache folder goes once no run
has used it for TTL_DAYS, and nothing else goes (files, links, what a run marked lately)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.cache_expiry import TTL_DAYS, last_used, mark_used, remove_unused


def _at(path: Path, days_ago: float) -> None:
    then = time.time() - days_ago * 86400
    os.utime(path, (then, then), follow_symlinks=False)


def test_only_folders_unused_for_the_horizon_are_removed(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    old_marked, fresh_marked, old_unmarked, fresh_unmarked = (root / n for n in ("a", "b", "c", "d"))
    for folder in (old_marked, fresh_marked, old_unmarked, fresh_unmarked):
        (folder / "inside").mkdir(parents=True)
    for folder in (old_marked, fresh_marked):
        mark_used(folder)
    _at(old_marked / ".used", TTL_DAYS + 1)
    _at(fresh_marked, TTL_DAYS + 1)              # its mark says it was used now: that is what counts
    _at(old_unmarked, TTL_DAYS + 1)              # never marked: the folder's own time
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _at(elsewhere, TTL_DAYS + 1)
    (root / "link").symlink_to(elsewhere)
    _at(root / "link", TTL_DAYS + 1)
    (root / "file").write_text("not ours")
    _at(root / "file", TTL_DAYS + 1)

    assert sorted(remove_unused(root)) == ["a", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["b", "d", "file", "link"]
    assert elsewhere.is_dir()                     # a link is not followed
    assert last_used(fresh_marked) > time.time() - 60


def test_a_root_that_is_not_there_removes_nothing(tmp_path):
    assert remove_unused(tmp_path / "absent") == []
