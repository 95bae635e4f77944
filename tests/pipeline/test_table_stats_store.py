"""validate's stored per-batch statistics of a table snapshot (pipeline/table_stats.py): a new
night reads only its own rows; a batch whose file changed is read again; a damaged entry is
read again with a warning, never trusted; the manifest is each batch's sample of the newest
``table.train_batches`` batches; and a drifted batch found from stored statistics is refused."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.tables import generate_transactions
from pipeline.config import parse
from pipeline.kinds.table import _table_manifest
from pipeline.layout import Layout
from tests.cache_age import last_used_days_ago
from tests.scratch import deep_update

PROJECT = Path(__file__).resolve().parents[2]


def _layout(root: Path, **table) -> Layout:
    (root / ".dvc").mkdir(parents=True, exist_ok=True)  # a DVC repository: its cache holds the statistics
    params = deep_update(yaml.safe_load((PROJECT / "params.yaml").read_text()),
                         {"data": {"kind": "table"}, "model": {"type": "deep_sad"}, "table": table,
                          "validate": {"min_good": 10, "min_anomalies": 5, "anomaly_ratio": [0.01, 0.2]}})
    return Layout(root, parse(params))


def _night(layout: Layout, number: int, rows: int = 1500, parquet: bool = False) -> Path:
    layout.raw.mkdir(parents=True, exist_ok=True)
    frame = generate_transactions(rows, 5, f"batch-{number:04d}")
    path = layout.raw / f"batch-{number:04d}.{'parquet' if parquet else 'csv'}"
    frame.to_parquet(path, index=False) if parquet else frame.to_csv(path, index=False)
    return path


def _snapshot(layout: Layout) -> list:
    """Each batch's statistics, straight from pipeline/table_stats.py (as validate gets them)."""
    from pipeline.kinds.table import table_rules, text_columns
    from pipeline.table_stats import snapshot_stats

    spec = table_rules(layout.config).stats_spec(layout.config.table.rows_per_batch)
    return snapshot_stats(layout, spec, text_columns(layout.config))[0]


def _validate(layout: Layout, capsys) -> tuple[pd.DataFrame | None, object, str]:
    """(manifest, report, what was printed: standard output, then standard error)."""
    manifest, report = _table_manifest(layout)
    printed = capsys.readouterr()
    return manifest, report, printed.out + printed.err


def test_a_night_reads_only_its_own_rows_and_a_changed_file_is_read_again(tmp_path, capsys):
    layout = _layout(tmp_path)
    for night in (1, 2):
        _night(layout, night, parquet=night == 2)
    manifest, report, out = _validate(layout, capsys)
    assert report.success and "2 batches, 2 read (3000 rows), 0 from their stored statistics" in out
    _night(layout, 3)
    manifest, report, out = _validate(layout, capsys)
    assert report.success and "3 batches, 1 read (1500 rows), 2 from their stored statistics" in out
    assert report.n_files == 4500 and len(manifest) == 4500 and set(manifest["batch"]) == {
        "batch-0001", "batch-0002", "batch-0003"}
    # a batch re-exported with other content (same name) is read again, not taken from the store
    frame = generate_transactions(1500, 6, "batch-0002")
    frame["amount"] = frame["amount"] * 3
    path = layout.raw / "batch-0002.parquet"
    frame.to_parquet(path, index=False)
    os.utime(path, ns=(0, 0))
    manifest, report, out = _validate(layout, capsys)
    assert "1 read (1500 rows), 2 from their stored statistics" in out
    assert not report.success and any("'amount' has not drifted" in f["description"] and "batch-0002" in
                                       f["description"] for f in report.failures)


def test_a_damaged_stored_entry_is_read_again_with_a_warning(tmp_path, capsys):
    layout = _layout(tmp_path)
    _night(layout, 1)
    _validate(layout, capsys)
    [summary] = list(layout.table_stats_cache.rglob("summary.json"))
    summary.write_text("{ not json")
    manifest, report, out = _validate(layout, capsys)
    assert report.success and "1 read (1500 rows), 0 from their stored statistics" in out
    assert "the stored statistics of batch batch-0001 cannot be read" in out


def test_the_manifest_is_the_newest_batches_samples(tmp_path, capsys):
    layout = _layout(tmp_path, rows_per_batch=400, train_batches=2)
    for night in (1, 2, 3):
        _night(layout, night, rows=1000)
    manifest, report, out = _validate(layout, capsys)
    assert report.success and report.n_files == 3000          # validation saw every row
    assert len(manifest) == 800 and set(manifest["batch"]) == {"batch-0002", "batch-0003"}
    assert "the manifest holds 800 of the 3000 rows validated" in out
    assert manifest["transaction_id"].is_unique and set(manifest["split"]) == {"train", "calibration", "test"}
    # the same rows on the next run, from the stored samples
    again, _, out = _validate(layout, capsys)
    assert "0 read" in out
    # (text columns come back from the store in pandas' str dtype, not object: the values are what count)
    pd.testing.assert_frame_equal(manifest.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)


def test_batches_older_than_training_and_the_drift_window_are_not_read(tmp_path, capsys):
    # the newest 2 batches are checked, each against the 2 before it: the newest 4 are used
    layout = _layout(tmp_path, train_batches=2, drift={"window": 2})
    for night in range(1, 7):
        _night(layout, night, rows=1000)
    (layout.raw / "batch-0001.csv").write_text("not,a\ntable")       # damaged, but nothing of it is used
    manifest, report, out = _validate(layout, capsys)
    assert report.success, report.failures
    assert ("6 batches, 2 older ones not read (beyond the drift window and table.train_batches before it), "
            "4 read (4000 rows)") in out
    assert report.n_files == 4000 and set(manifest["batch"]) == {"batch-0005", "batch-0006"}
    # the same damage inside the window is refused by name
    (layout.raw / "batch-0004.csv").write_text("not,a\ntable")
    manifest, report, out = _validate(layout, capsys)
    assert manifest is None and not report.success
    assert any("batch-0004" in f["description"] for f in report.failures), report.failures


def _with_category(layout: Layout, number: int, category: str) -> None:
    path = layout.raw / f"batch-{number:04d}.csv"
    frame = pd.read_csv(path)
    frame.loc[:4, "merchant_category"] = category
    frame.to_csv(path, index=False)


def test_a_recent_batch_is_judged_against_the_same_batches_every_night(tmp_path, capsys):
    """A category is new to a recent batch when none of the train_batches batches before it had
    it: the same verdict every night the batch is checked, whatever has left the window since."""
    layout = _layout(tmp_path, train_batches=2, drift={"window": 2},
                     columns={"merchant_category": {"type": "categorical", "allowed": None}})
    for night in range(1, 5):
        _night(layout, night, rows=1000)
    _with_category(layout, 1, "pawnshop")   # seen two batches before batch 3 had it again
    _with_category(layout, 3, "pawnshop")
    manifest, report, out = _validate(layout, capsys)
    assert report.success, report.failures
    _night(layout, 5, rows=1000)            # batch 1 leaves the window; batch 3 is no longer recent
    manifest, report, out = _validate(layout, capsys)
    assert report.success, report.failures
    _night(layout, 6, rows=1000)
    _with_category(layout, 6, "casino")     # new to the two batches before it: refused
    manifest, report, out = _validate(layout, capsys)
    assert not report.success and any("casino" in f["description"] and "batch-0006" in f["description"]
                                      for f in report.failures), report.failures


def test_an_empty_export_inside_the_window_does_not_cancel_a_drift_check(tmp_path, capsys):
    layout = _layout(tmp_path, train_batches=1, drift={"window": 1})   # 2 batches with rows are used
    for night in range(1, 5):
        _night(layout, night, rows=1000)
    path = layout.raw / "batch-0004.csv"
    frame = pd.read_csv(path)
    frame["amount"] = frame["amount"] * 50
    frame.to_csv(path, index=False)
    frame.head(0).to_csv(layout.raw / "batch-0005.csv", index=False)   # tonight's export: a header only
    manifest, report, out = _validate(layout, capsys)
    assert "5 batches, 2 older ones not read" in out
    assert not report.success and any("'amount' has not drifted" in f["description"] and "batch-0004" in
                                      f["description"] and "batch-0003" in f["description"]
                                      for f in report.failures), report.failures


def test_a_run_takes_at_most_rows_per_run_rows_a_uniform_draw_by_key(tmp_path, capsys):
    from components.table_stats import sample_order

    layout = _layout(tmp_path, rows_per_batch=400, train_batches=3, rows_per_run=300)
    paths = [_night(layout, night, rows=1000 + 500 * night) for night in (1, 2, 3, 4)]
    manifest, report, out = _validate(layout, capsys)
    assert report.success and len(manifest) == 300
    assert "at most 300 in all (table.rows_per_run)" in out
    # the rows whose sample order is smallest among every row of the three training batches: what
    # one sample of their union would hold, so each batch gives its share of the rows
    rows = pd.concat([pd.read_csv(p, dtype={"transaction_id": str}) for p in paths[1:]], ignore_index=True)
    order = sample_order(rows["transaction_id"])
    expected = set(rows["transaction_id"][order <= pd.Series(order).nsmallest(300).max()])
    assert set(manifest["transaction_id"]) == expected
    shares = manifest["batch"].value_counts()
    assert set(shares.index) == {"batch-0002", "batch-0003", "batch-0004"} and shares["batch-0004"] > shares["batch-0002"]


@pytest.mark.parametrize("bad", ["bad.parquet", "empty.csv"])
def test_an_unreadable_file_fails_validation_by_name(tmp_path, capsys, bad):
    layout = _layout(tmp_path)
    _night(layout, 1)
    (layout.raw / bad).write_bytes(b"" if bad.endswith(".csv") else b"cut short")
    manifest, report, _ = _validate(layout, capsys)
    assert manifest is None and not report.success
    assert [f["expectation"] for f in report.failures] == ["readable_files"]
    assert bad in report.failures[0]["description"]


def test_a_file_of_a_batch_exported_without_the_key_or_a_column_is_refused_by_name(tmp_path, capsys):
    layout = _layout(tmp_path)
    folder = layout.raw / "batch-0001"
    folder.mkdir(parents=True)
    frame = generate_transactions(1500, 5, "batch-0001")
    frame.iloc[:750].to_csv(folder / "part-0.csv", index=False)
    frame.iloc[750:].drop(columns=["transaction_id", "amount"]).to_csv(folder / "part-1.csv", index=False)
    manifest, report, _ = _validate(layout, capsys)
    assert manifest is None and not report.success
    failed = {f["description"] for f in report.failures}
    for name in ("transaction_id", "amount"):
        assert f"the column '{name}' exists in every batch and file (missing in batch-0001: batch-0001/part-1.csv)" \
            in failed
    assert "every row has a key ('transaction_id') (750 rows do not)" in failed


def test_a_damaged_stored_sample_is_read_again_not_trusted(tmp_path, capsys):
    layout = _layout(tmp_path)
    _night(layout, 1)
    first, _, _ = _validate(layout, capsys)
    [sample] = list(layout.table_stats_cache.rglob("sample.parquet"))
    sample.write_bytes(sample.read_bytes()[:100])  # cut short: a crash mid-write, a bad disk
    again, report, out = _validate(layout, capsys)
    assert report.success and "1 read (1500 rows), 0 from their stored statistics" in out
    assert "the stored statistics of batch batch-0001 cannot be read" in out
    pd.testing.assert_frame_equal(first, again, check_dtype=False)


def test_an_entry_another_run_removes_while_in_use_is_read_again_without_alarm(tmp_path, capsys):
    """Another run may find an entry unused for 30 days just as this one loads it: the sample,
    read later, is then gone. The batch is read again and the warning says why, not "damaged"."""
    from pipeline.caches import discard

    layout = _layout(tmp_path)
    _night(layout, 1)
    expected = _snapshot(layout)[0].sample
    [stored] = _snapshot(layout)                          # loaded; its sample not yet read
    [entry] = [p.parent for p in layout.table_stats_cache.rglob("summary.json")]
    capsys.readouterr()
    assert discard(entry)
    pd.testing.assert_frame_equal(stored.sample, expected, check_dtype=False)  # read: object, stored: str
    err = capsys.readouterr().err
    assert "was removed by another run while in use; reading the batch" in err and "cannot be read" not in err


def test_stored_batches_no_run_used_for_30_days_are_removed(tmp_path, capsys, monkeypatch):
    """The store does not grow for ever: an entry of a batch that left the window, and a
    namespace of old code or old declarations, go once no run has used them for 30 days;
    what tonight uses stays, however old it was, its namespace included."""
    layout = _layout(tmp_path, train_batches=1, drift={"window": 1})   # the newest 2 batches are used
    wide = _layout(tmp_path, train_batches=None, drift={"window": 1})  # every batch is used
    for night in range(1, 4):
        _night(layout, night, rows=1000)
    _validate(layout, capsys)
    assert "1 read (1000 rows), 2 from their stored statistics" in _validate(wide, capsys)[2]  # batch 1 too
    [store] = list(layout.table_stats_cache.iterdir())
    entries = sorted(p for p in store.iterdir() if p.is_dir())
    assert len(entries) == 3 and all((p / ".used").exists() for p in entries)
    stale_namespace = layout.table_stats_cache / "0123456789abcdef0123"
    recent_namespace = layout.table_stats_cache / "fedcba9876543210fedc"
    for folder in (stale_namespace, recent_namespace):
        folder.mkdir()
    last_used_days_ago(recent_namespace, 29)
    for folder in (stale_namespace, store, *entries):
        last_used_days_ago(folder, 31)

    # a cache this run cannot mark its namespace in: nothing is removed (it might be its own)
    import pipeline.table_stats as table_stats

    with monkeypatch.context() as patched:
        patched.setattr(table_stats, "mark_used", lambda folder: False)
        manifest, report, out = _validate(layout, capsys)
    assert report.success and "removed" not in out and stale_namespace.exists()
    assert len([p for p in store.iterdir() if p.is_dir()]) == 3

    manifest, report, out = _validate(layout, capsys)
    assert report.success, report.failures
    assert ("3 batches, 1 older ones not read (beyond the drift window and table.train_batches before it), "
            "0 read (0 rows), 2 from their stored statistics; removed as unused for 30 days: 1 stored batch "
            "and 1 store of other code, library versions or settings") in out
    kept = sorted(p for p in store.iterdir() if p.is_dir())
    assert len(kept) == 2 and set(kept) < set(entries)
    assert not stale_namespace.exists() and recent_namespace.exists() and store.is_dir()
    # the batch that was removed is read again, and stored again, when a run uses it
    manifest, report, out = _validate(wide, capsys)
    assert "1 read (1000 rows), 2 from their stored statistics" in out
    assert len([p for p in store.iterdir() if p.is_dir()]) == 3


def test_a_folder_that_is_no_entry_does_not_keep_a_batch_from_being_stored(tmp_path, capsys):
    """A removal cut short can leave an entry's folder without its summary (a mark, a file or
    two): the batch is read, the husk is moved out of the way and the entry stored, once."""
    layout = _layout(tmp_path)
    _night(layout, 1)
    _validate(layout, capsys)
    [entry] = [p.parent for p in layout.table_stats_cache.rglob("summary.json")]
    for name in ("summary.json", "sample.parquet"):
        (entry / name).unlink()
    manifest, report, out = _validate(layout, capsys)
    assert report.success and "1 read (1500 rows), 0 from their stored statistics" in out
    assert (entry / "summary.json").exists() and (entry / "sample.parquet").exists()
    manifest, report, out = _validate(layout, capsys)
    assert "0 read (0 rows), 1 from their stored statistics" in out


def test_a_run_storing_a_batch_another_run_just_stored_leaves_that_entry_alone(tmp_path, capsys):
    """Two runs at once read the same new batch: the second to store finds a whole entry in
    place and keeps it (not moved away as if it were a husk), without a warning; a folder that
    is no entry is never marked, so that it expires."""
    from pipeline.table_stats import _store, _use

    layout = _layout(tmp_path)
    _night(layout, 1)
    [stats] = _snapshot(layout)
    [entry] = [p.parent for p in layout.table_stats_cache.rglob("summary.json")]
    inode = entry.stat().st_ino
    capsys.readouterr()
    _store(entry, stats)                                  # the second run's store of the same batch
    assert entry.stat().st_ino == inode and capsys.readouterr().err == ""
    assert sorted(p.name for p in entry.parent.iterdir()) == [".used", entry.name]  # no temporary left

    husk = entry.parent / ("0" * 64)
    husk.mkdir()
    _use(husk)
    assert list(husk.iterdir()) == []
