"""pipeline/caches.py: what the pipeline keeps in the DVC cache folder goes once no run has used
it for TTL_DAYS, and nothing else goes (files, links, what a run marked lately); a folder is
renamed away before it is deleted, so a run marking it at that moment cannot keep a husk."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.caches import GONE, TTL_DAYS, discard, last_used, mark_used, remove_unused
from tests.cache_age import last_used_days_ago


def test_only_folders_unused_for_the_horizon_are_removed(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    old_marked, fresh_marked, old_unmarked, fresh_unmarked = (root / n for n in ("a", "b", "c", "d"))
    for folder in (old_marked, fresh_marked, old_unmarked, fresh_unmarked):
        (folder / "inside").mkdir(parents=True)
    for folder in (old_marked, fresh_marked):
        assert mark_used(folder)
    last_used_days_ago(old_marked, TTL_DAYS + 1)
    long_ago = time.time() - (TTL_DAYS + 1) * 86400
    os.utime(fresh_marked, (long_ago, long_ago))          # an old folder with a mark of now: kept
    last_used_days_ago(old_unmarked, TTL_DAYS + 1)        # never marked: the folder's own time counts
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    last_used_days_ago(elsewhere, TTL_DAYS + 1)
    (root / "link").symlink_to(elsewhere)
    last_used_days_ago(root / "link", TTL_DAYS + 1)
    (root / "file").write_text("not ours")
    last_used_days_ago(root / "file", TTL_DAYS + 1)
    half_removed = root / f"{GONE}0123"                   # a removal cut short, however recent
    half_removed.mkdir()

    assert sorted(remove_unused(root)) == ["a", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["b", "d", "file", "link"]
    assert elsewhere.is_dir()                             # a link is neither followed nor moved
    assert last_used(fresh_marked) > time.time() - 60
    assert remove_unused(root, ttl_days=0) and sorted(p.name for p in root.iterdir()) == ["file", "link"]


def test_a_mark_that_comes_while_a_folder_is_deleted_leaves_nothing_under_its_name(tmp_path, monkeypatch):
    """Another run marks the folder after its files are deleted and before the folder itself is:
    had it been deleted in place, a folder holding only the fresh mark would stay under the
    entry's name (no entry, never expiring, in the way of storing it again)."""
    import pipeline.caches as caches

    folder = tmp_path / "entry"
    folder.mkdir()
    (folder / "summary.json").write_text("{}")

    def rmtree_with_a_mark_midway(path, ignore_errors=False):
        """What shutil.rmtree(ignore_errors=True) does: the files it listed, then the folder."""
        for inside in list(Path(path).iterdir()):
            inside.unlink()
        mark_used(folder)                                 # the other run, by the entry's name
        try:
            os.rmdir(path)
        except OSError:                                   # not empty any more: left, as rmtree would
            pass

    monkeypatch.setattr(caches.shutil, "rmtree", rmtree_with_a_mark_midway)
    assert discard(folder)
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    assert not discard(folder)                            # gone already: not this call's removal


def test_a_folder_marked_after_the_check_is_put_back(tmp_path):
    folder = tmp_path / "entry"
    folder.mkdir()
    assert mark_used(folder)
    horizon = time.time() - TTL_DAYS * 86400
    assert not discard(folder, unless_used_since=horizon)  # marked now, after the caller's check
    assert folder.is_dir() and [p.name for p in tmp_path.iterdir()] == ["entry"]
    last_used_days_ago(folder, TTL_DAYS + 1)
    assert discard(folder, unless_used_since=horizon) and list(tmp_path.iterdir()) == []


def test_a_root_that_is_not_there_removes_nothing(tmp_path):
    assert remove_unused(tmp_path / "absent") == []
