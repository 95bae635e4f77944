"""preprocess's decoded-image cache: a grown snapshot decodes only its new files, and the
output is the same bytes whether its rows were decoded, read from the cache, or both.

Real PNG files and the real stage, called in-process on small workspaces that share one
DVC cache folder the way run workspaces do (an absolute ``[cache] dir`` in
.dvc/config.local). The manifest is built by components.validation.build_manifest, as the
validate stage builds it, without the Great Expectations suite (slow to import, and not
what is tested here).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.images import discover
from components.synthetic import BatchSpec, write_batch
from components.validation import build_manifest
from pipeline.config import parse
from pipeline.layout import Layout, dvc_cache_dir
from detector.decode import DecodeLimits
from pipeline import decoded_cache
from pipeline.stages import preprocess

PROJECT = Path(__file__).resolve().parents[2]
SPEC = BatchSpec(n_good=30, n_per_defect=3, size=48)  # 42 images a batch
OUTPUTS = ("train_images.npy", "calibration_images.npy", "test_images.npy", "index.parquet")


def _params(**preprocess_params) -> dict:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["preprocess"].update({"image_size": 16, **preprocess_params})
    return params


def _workspace(root: Path, cache: Path | None, batches: list[tuple[str, int]], **preprocess_params) -> Layout:
    """A run workspace: raw snapshot of ``batches`` (name, seed), its manifest, and a .dvc
    folder whose config.local points at the shared ``cache`` (as pipeline.workspace does)."""
    params = _params(**preprocess_params)
    layout = Layout(root, parse(params))
    (root / ".dvc").mkdir(parents=True, exist_ok=True)
    if cache is not None:
        (root / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {cache}\n")
    for name, seed in batches:
        source = _batch(root.parent / "batches", name, seed)
        shutil.copytree(source, layout.raw / name)
    files = discover(layout.raw, params["data"]["extensions"])
    split = params["preprocess"]["split"]
    manifest = build_manifest(files, (split["train"], split["calibration"], split["test"]))
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_parquet(layout.manifest, index=False)
    return layout


def _batch(folder: Path, name: str, seed: int) -> Path:
    """Each batch's PNG files are generated once and copied into every workspace."""
    if not (folder / name).is_dir():
        write_batch(folder, name, seed=seed, spec=SPEC)
    return folder / name


def _outputs(layout: Layout) -> dict[str, bytes]:
    return {name: (layout.processed / name).read_bytes() for name in OUTPUTS}


def _packs(cache: Path) -> list[Path]:
    return sorted(cache.glob("anomaly-preprocess/*/*.pack.npy"))


ONE = [("batch-0001", 1)]
TWO = [("batch-0001", 1), ("batch-0002", 2)]


def test_the_cache_folder_is_the_workspaces_dvc_cache(tmp_path):
    root = tmp_path / "ws"
    assert dvc_cache_dir(root) is None  # not a DVC repository: no cache
    (root / ".dvc").mkdir(parents=True)
    assert dvc_cache_dir(root) == root / ".dvc" / "cache"
    (root / ".dvc" / "config").write_text("[core]\n    remote = local\n[cache]\n    dir = ../../shared\n"
                                          "['remote \"local\"']\n    url = ../remote\n")
    assert dvc_cache_dir(root) == (tmp_path / "shared").resolve()  # relative to .dvc/
    (root / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {tmp_path / 'local'}\n")
    assert dvc_cache_dir(root) == tmp_path / "local"  # config.local first


def test_cached_partly_cached_and_from_scratch_give_the_same_bytes(tmp_path):
    cache = tmp_path / "cache"
    scratch = _workspace(tmp_path / "scratch", None, TWO)  # no DVC cache at all: everything decoded
    counts = preprocess.run(scratch)
    assert (counts["decoded"], counts["from_cache"]) == (84, 0)
    expected = _outputs(scratch)

    first = _workspace(tmp_path / "first", cache, ONE)  # fills the cache with batch 1
    assert (preprocess.run(first)["decoded"], len(_packs(cache))) == (42, 1)

    grown = _workspace(tmp_path / "grown", cache, TWO)  # a new nightly batch: only it is decoded
    counts = preprocess.run(grown)
    assert (counts["decoded"], counts["from_cache"]) == (42, 42)
    assert _outputs(grown) == expected
    assert len(_packs(cache)) == 2

    again = _workspace(tmp_path / "again", cache, TWO)  # nothing new: nothing decoded
    counts = preprocess.run(again)
    assert (counts["decoded"], counts["from_cache"]) == (0, 84)
    assert _outputs(again) == expected
    assert len(_packs(cache)) == 2  # a run that decoded nothing writes no pack
    assert counts["train"]["items"] + counts["calibration"]["items"] + counts["test"]["items"] == 84


def test_a_changed_image_size_or_decoder_does_not_reuse_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    preprocess.run(_workspace(tmp_path / "a", cache, ONE))
    bigger = _workspace(tmp_path / "b", cache, ONE, image_size=24)
    counts = preprocess.run(bigger)
    assert (counts["decoded"], counts["from_cache"]) == (42, 0)
    assert np.load(bigger.split_items("train")).shape[1:] == (3, 24, 24)
    assert len(list((cache / "anomaly-preprocess").iterdir())) == 2  # one namespace per size

    grey = _workspace(tmp_path / "c", cache, ONE, channels=1)
    assert preprocess.run(grey)["decoded"] == 42
    limits = _workspace(tmp_path / "d", cache, ONE, max_pixels=10_000_000)
    assert preprocess.run(limits)["decoded"] == 42

    # another decoder (detector/decode.py's source) is another namespace
    namespace = decoded_cache.cache_namespace(16, 3, DecodeLimits(50_000_000, 52428800))
    import detector.decode as images

    changed = tmp_path / "images.py"
    changed.write_text(Path(images.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(images, "__file__", str(changed))
    assert decoded_cache.cache_namespace(16, 3, DecodeLimits(50_000_000, 52428800)) != namespace


def test_a_deleted_truncated_or_malformed_pack_means_decoding_again(tmp_path, capsys):
    cache = tmp_path / "cache"
    preprocess.run(_workspace(tmp_path / "one", cache, ONE))
    preprocess.run(_workspace(tmp_path / "two", cache, TWO))
    first, second = _packs(cache)
    scratch = _workspace(tmp_path / "scratch", None, TWO)
    preprocess.run(scratch)
    expected = _outputs(scratch)

    first.unlink()  # its data vanished (another run merged it away) while its keys are listed
    capsys.readouterr()
    layout = _workspace(tmp_path / "after-delete", cache, TWO)
    counts = preprocess.run(layout)
    assert (counts["decoded"], counts["from_cache"]) == (42, 42)
    assert "vanished" in capsys.readouterr().err
    assert _outputs(layout) == expected

    for pack in _packs(cache):  # truncated: the header promises more rows than the file holds
        pack.write_bytes(pack.read_bytes()[:-100])
    layout = _workspace(tmp_path / "after-truncate", cache, TWO)
    counts = preprocess.run(layout)
    assert (counts["decoded"], counts["from_cache"]) == (84, 0)
    assert "malformed" in capsys.readouterr().err
    assert _outputs(layout) == expected
    assert len(_packs(cache)) == 1  # the malformed packs are removed, the new one holds everything

    (pack,) = _packs(cache)
    keys = pack.with_name(pack.name.replace(".pack.npy", ".keys.npy"))
    keys.write_bytes(b"not a numpy file")
    layout = _workspace(tmp_path / "after-garbage", cache, TWO)
    assert preprocess.run(layout)["decoded"] == 84
    assert _outputs(layout) == expected
    assert preprocess.run(_workspace(tmp_path / "healed", cache, TWO))["decoded"] == 0


def test_a_pack_that_cannot_be_read_mid_run_means_decoding_again(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    preprocess.run(_workspace(tmp_path / "one", cache, TWO))
    real = decoded_cache._pread_exact
    calls = {"n": 0}

    def failing(fd, count, offset):
        calls["n"] += 1
        if calls["n"] > 1:  # the first read succeeds, the read-ahead after it fails
            raise OSError(5, "Input/output error")
        return real(fd, count, offset)

    monkeypatch.setattr(decoded_cache, "_pread_exact", failing)
    layout = _workspace(tmp_path / "io-error", cache, TWO)
    counts = preprocess.run(layout)
    assert counts["from_cache"] > 0 and counts["decoded"] > 0 and counts["from_cache"] + counts["decoded"] == 84
    assert "cannot read cache pack" in capsys.readouterr().err
    monkeypatch.setattr(decoded_cache, "_pread_exact", real)
    scratch = _workspace(tmp_path / "scratch", None, TWO)
    preprocess.run(scratch)
    assert _outputs(layout) == _outputs(scratch)


def test_compaction_merges_the_packs_and_keeps_every_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(decoded_cache, "MAX_PACKS", 2)
    cache = tmp_path / "cache"
    batches = [(f"batch-{n:04d}", n) for n in range(1, 5)]

    def keys_of(pack: Path) -> list[bytes]:
        return np.load(pack.with_name(pack.name.replace(".pack.npy", ".keys.npy"))).tolist()

    for count in (1, 2):
        preprocess.run(_workspace(tmp_path / f"run{count}", cache, batches[:count]))
    assert len(_packs(cache)) == 2
    preprocess.run(_workspace(tmp_path / "run3", cache, batches[:3]))  # a third pack: all merged into one
    (merged,) = _packs(cache)
    assert len(keys_of(merged)) == len(set(keys_of(merged))) == 126

    # two runs that decoded the same files at once leave the same entries twice
    twin = merged.with_name("00000000T000000-twin.pack.npy")
    shutil.copy2(merged, twin)
    shutil.copy2(merged.with_name(merged.name.replace(".pack.npy", ".keys.npy")),
                 twin.with_name("00000000T000000-twin.keys.npy"))
    counts = preprocess.run(_workspace(tmp_path / "run4", cache, batches))
    assert (counts["decoded"], counts["from_cache"]) == (42, 126)
    (merged,) = _packs(cache)  # three packs again: merged, each entry once
    assert len(keys_of(merged)) == len(set(keys_of(merged))) == 168
    assert not [p for p in merged.parent.iterdir() if ".tmp" in p.name]

    layout = _workspace(tmp_path / "from-merged", cache, batches)
    counts = preprocess.run(layout)
    assert (counts["decoded"], counts["from_cache"]) == (0, 168)
    scratch = _workspace(tmp_path / "scratch", None, batches)
    preprocess.run(scratch)
    assert _outputs(layout) == _outputs(scratch)


def test_a_run_that_finds_another_merging_leaves_the_packs_to_it(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(decoded_cache, "MAX_PACKS", 1)
    cache = tmp_path / "cache"
    batches = [(f"batch-{n:04d}", n) for n in range(1, 4)]
    preprocess.run(_workspace(tmp_path / "run1", cache, batches[:1]))
    (folder,) = {pack.parent for pack in _packs(cache)}
    with open(folder / ".compact.lock", "a") as held:  # another run, merging now
        fcntl.flock(held, fcntl.LOCK_EX)
        counts = preprocess.run(_workspace(tmp_path / "run2", cache, batches[:2]))
        assert (counts["decoded"], counts["from_cache"]) == (42, 42)
        assert len(_packs(cache)) == 2  # not merged under the other's feet
    counts = preprocess.run(_workspace(tmp_path / "run3", cache, batches))
    assert (counts["decoded"], counts["from_cache"]) == (42, 84)
    assert len(_packs(cache)) == 1  # the lock is free again: merged


def test_a_pack_whose_keys_never_came_is_removed_once_old(tmp_path, monkeypatch, capsys):
    import os
    import time

    cache = tmp_path / "cache"
    preprocess.run(_workspace(tmp_path / "run1", cache, ONE))
    (pack,) = _packs(cache)
    old, fresh = pack.with_name("00000000T000000-old.pack.npy"), pack.with_name("99999999T999999-new.pack.npy")
    for orphan in (old, fresh):  # a run killed between the data's rename and the keys'
        shutil.copy2(pack, orphan)
    stale = time.time() - decoded_cache.ORPHAN_PACK_AGE_S - 60
    os.utime(old, (stale, stale))
    counts = preprocess.run(_workspace(tmp_path / "run2", cache, ONE))
    assert (counts["decoded"], counts["from_cache"]) == (0, 42)
    assert not old.exists() and old.name in capsys.readouterr().err
    assert fresh.exists()  # its run may still be writing the keys


@pytest.mark.slow
def test_dvc_gc_leaves_the_cache_alone(tmp_path):
    """The packs live in DVC's cache folder, outside the object stores `dvc gc` cleans."""
    root = tmp_path / "repo"
    root.mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    layout = _workspace(root, None, ONE)
    assert preprocess.run(layout)["decoded"] == 42
    packs = _packs(root / ".dvc" / "cache")
    assert len(packs) == 1
    done = subprocess.run([sys.executable, "-m", "dvc", "gc", "--workspace", "--force"], cwd=root,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _packs(root / ".dvc" / "cache") == packs
    assert preprocess.run(_workspace(tmp_path / "again", root / ".dvc" / "cache", ONE))["decoded"] == 0


def test_a_cache_that_cannot_be_written_never_fails_the_stage(tmp_path, monkeypatch, capsys):
    scratch = _workspace(tmp_path / "scratch", None, ONE)
    preprocess.run(scratch)
    expected = _outputs(scratch)

    blocked = tmp_path / "a-file"  # the cache folder cannot be made: a file is in the way
    blocked.write_text("")
    layout = _workspace(tmp_path / "blocked", blocked / "cache", ONE)
    assert preprocess.run(layout)["decoded"] == 42
    assert "cannot use the decoded-image cache" in capsys.readouterr().err
    assert _outputs(layout) == expected

    real = decoded_cache.Rows._flush

    def disk_full_in_the_cache(self):
        if "anomaly-preprocess" in str(self.handle.name):
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(decoded_cache.Rows, "_flush", disk_full_in_the_cache)  # the disk fills up mid-pack
    cache = tmp_path / "cache"
    layout = _workspace(tmp_path / "full-disk", cache, ONE)
    assert preprocess.run(layout)["decoded"] == 42
    assert "cannot write the decoded-image cache (new images)" in capsys.readouterr().err
    assert _outputs(layout) == expected
    assert _packs(cache) == [] and not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_a_file_changed_after_validation_stops_the_stage_and_is_not_cached(tmp_path):
    """Decoding skips Pillow's checksum pass (validation did it), so only the bytes validation
    checked may be decoded: a file whose content no longer matches the manifest is refused."""
    from pipeline.io import DataError

    cache = tmp_path / "cache"
    layout = _workspace(tmp_path / "ws", cache, ONE)
    victim = sorted(layout.raw.rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:-12] + b"\0" * 12)  # same size, other bytes
    with pytest.raises(DataError, match="changed since validate"):
        preprocess.run(layout)
    assert not layout.processed.exists() and _packs(cache) == []


def test_a_namespace_no_run_used_for_30_days_is_removed(tmp_path):
    """An image size or decoder that no run uses any more leaves its namespace behind; it goes
    once no run has used it for caches.TTL_DAYS, and the one in use stays however old."""
    from pipeline.caches import TTL_DAYS
    from tests.cache_age import last_used_days_ago

    cache = tmp_path / "cache"
    preprocess.run(_workspace(tmp_path / "a", cache, ONE))
    (old,) = (cache / "anomaly-preprocess").iterdir()
    preprocess.run(_workspace(tmp_path / "b", cache, ONE, image_size=24))
    (in_use,) = set((cache / "anomaly-preprocess").iterdir()) - {old}
    for folder in (old, in_use):
        last_used_days_ago(folder, TTL_DAYS + 1)
    counts = preprocess.run(_workspace(tmp_path / "c", cache, ONE, image_size=24))
    assert (counts["decoded"], counts["from_cache"]) == (0, 42)
    assert list((cache / "anomaly-preprocess").iterdir()) == [in_use]
