"""The per-batch statistics of a table snapshot, stored so that a night reads only its own rows.

validate streams each batch of the raw snapshot through components/table_stats.py once and
stores what it found beside the decoded-image cache, in the DVC cache the workspace uses
(``Layout.table_stats_cache``: shared by every run workspace of a project; `dvc gc` leaves it
alone). A batch is found there by the sha256 of its files' contents (hashed every run, about
2 GB/s: a memo by size and mtime would take a same-size re-export for the old file), under a
namespace that hashes everything that changes the statistics (the declared columns and their
types, the key and label, ``table.rows_per_batch``, the code of components/table_stats.py,
components/tables.py and detector/transform.py, the pandas, numpy and pyarrow versions): a
stored batch can only be the statistics of those very bytes.

The store is an optimisation: an entry that cannot be read (checked whole when loaded; its
sample when first read) is computed again (with a warning), and one that cannot be written
costs a warning, never the stage. Entries are written into a temporary folder and renamed into
place, so runs at once never see a half-written one. Each run marks the entries it used; an
entry no run has used for 30 days (a batch that left the window, or was deleted or re-exported)
is removed, and so is a namespace no run has used for as long (pipeline/caches.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.caches import discard, mark_used, remove_unused, switched_off
from pipeline.layout import Layout

STORE_FORMAT = 1
CACHE_ENV = "ANOMALY_PIPELINE_TABLE_STATS_CACHE"  # "off": neither read nor write (benchmarks, debugging)


def _warn(message: str) -> None:
    print(f"validate: {message}", file=sys.stderr, flush=True)


def namespace(spec) -> str:
    import components.table_stats as stats_code
    import components.tables as tables_code

    import pyarrow

    import detector.transform as transform_code  # category_text: how categories are read

    code = hashlib.sha256()
    for module in (stats_code, tables_code, transform_code):
        code.update(Path(module.__file__).read_bytes())
    inputs = {"format": STORE_FORMAT, "spec": spec.as_dict(), "code": code.hexdigest(), "pandas": pd.__version__,
              "numpy": np.__version__, "pyarrow": pyarrow.__version__}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _content_hash(path: Path) -> str:
    """The file's sha256, read in blocks (about 2 GB/s here). Always the bytes, never a memo
    by size and mtime: a re-export with the same size and a kept mtime (rsync -t, cp -p, an
    archive) would be taken for the old file and validated by the old file's statistics."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


SUMMARY_KEYS = {"rows", "columns", "key", "label", "sample_rows", "absent"}


def _load(folder: Path, batch: str, read_again):
    """A stored entry, checked whole before it is used: the summary's keys, the key hashes'
    header, the sample's Parquet footer and row count. The sample itself is read when first
    used; should that fail (the file damaged since), the batch is read again (``read_again``)."""
    import pyarrow.parquet as pq

    from components.table_stats import BatchStats

    summary = json.loads((folder / "summary.json").read_text())
    if not isinstance(summary, dict) or not SUMMARY_KEYS <= set(summary):
        raise ValueError(f"summary.json lacks {sorted(SUMMARY_KEYS - set(summary or {}))}")
    hashes = np.load(folder / "keys.npy", mmap_mode="r")  # read only where keys are compared
    sample_path = folder / "sample.parquet"
    if pq.read_metadata(sample_path).num_rows != summary["sample_rows"]:
        raise ValueError("sample.parquet does not hold the rows the summary counts")

    def sample() -> pd.DataFrame:
        try:
            return pd.read_parquet(sample_path)
        except Exception as error:
            _unusable(folder, batch, "sample", error)
            return read_again().sample

    return BatchStats(batch, summary, hashes, load_sample=sample)


def _unusable(folder: Path, batch: str, what: str, error: Exception) -> None:
    """Says why a stored entry cannot be used, and moves a damaged one out of the way. An entry
    that is gone altogether was removed by another run that found it unused for TTL_DAYS (in
    the moment before this run marked it): nothing is wrong, and nothing is to be removed."""
    if not os.path.lexists(folder):
        _warn(f"the stored {what} of batch {batch} was removed by another run while in use; reading the batch")
    else:
        _warn(f"the stored {what} of batch {batch} cannot be read ({error}); reading the batch")
        discard(folder)


def _use(folder: Path) -> None:
    """Marks a stored entry used by this run, so that no run removes it while runs use it. Only
    an entry that is there (a summary): a folder without one is no entry, and marking it would
    keep it from expiring. One that cannot be marked (a read-only cache) costs nothing."""
    if (folder / "summary.json").exists():
        mark_used(folder)


def _namespace(store: Path) -> bool:
    """Makes this run's namespace and marks it used; whether it could (not on a read-only cache)."""
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False  # said when a batch's statistics cannot be stored
    return mark_used(store)


def _store(folder: Path, stats) -> None:
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    try:
        temporary.mkdir(parents=True)
        (temporary / "summary.json").write_text(json.dumps(stats.summary))
        np.save(temporary / "keys.npy", stats.key_hashes)
        stats.sample.to_parquet(temporary / "sample.parquet", index=False)
        try:
            os.rename(temporary, folder)
        except OSError:
            if (folder / "summary.json").exists():  # another run stored the same batch at once
                return
            discard(folder)  # no entry (what a removal cut short left): out of the way
            os.rename(temporary, folder)
    except OSError as error:
        if not (folder / "summary.json").exists():
            _warn(f"cannot store the statistics of batch {stats.batch} in {folder.parent}: {error}; "
                  "the next run reads it again")
    except Exception as error:  # a sample pyarrow cannot write (mixed types): computed again next time
        _warn(f"cannot store the statistics of batch {stats.batch}: {error}; the next run reads it again")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _chunks(folder: Path, files: list[Path], text_columns: tuple[str, ...], chunk_rows: int):
    from components.tables import iter_table_file

    def read():
        for path in files:
            source = path.relative_to(folder).as_posix()
            for chunk in iter_table_file(path, text_columns, chunk_rows):
                clash = [name for name in ("batch", "source") if name in chunk.columns]
                if clash:
                    raise ValueError(f"{path.name}: has a column named {', '.join(clash)}, which the pipeline "
                                     "adds itself")
                yield chunk, source
    return read


def _entries(store: Path | None, raw: Path, batches: dict[str, list[Path]]) -> dict:
    """Each batch's folder in ``store``, named by its files' names and contents (or the OSError
    that kept a file from being read); nothing without a store. The files are hashed on a few
    threads at once (hashlib lets go of the GIL), which is most of the cost a long window adds."""
    from concurrent.futures import ThreadPoolExecutor

    if store is None:
        return {}

    def entry(batch: str) -> Path | OSError:
        try:
            identity = "\0".join([batch, *(f"{p.relative_to(raw).as_posix()}\0{_content_hash(p)}"
                                           for p in batches[batch])])
        except OSError as error:
            return error
        return store / hashlib.sha256(identity.encode()).hexdigest()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(batches, pool.map(entry, batches)))


def snapshot_stats(layout: Layout, spec, text_columns: tuple[str, ...],
                   window: int | None = None) -> tuple[list, list[str], dict]:
    """(the statistics of every batch of the raw snapshot with rows, in batch order; the files
    that could not be read, each with its reason; what was read and what was stored). With a
    ``window``, the newest ``window`` batches only: an older one is neither read nor hashed (a
    run uses nothing of it), so a night costs the same after ninety nights as after thirty."""
    from components.table_stats import batch_stats
    from components.tables import batch_files

    root = None if switched_off(CACHE_ENV) else layout.table_stats_cache
    store = root / namespace(spec) if root is not None else None
    grouped: dict[str, list[Path]] = {}
    for batch, path in batch_files(layout.raw):
        grouped.setdefault(batch, []).append(path)
    stats, unreadable = [], []
    counts = {"batches": len(grouped), "older": 0, "read": 0, "stored": 0, "rows_read": 0,
              "expired": 0, "expired_namespaces": 0}
    # expiry only where this run could say it uses its namespace (not on a read-only cache): a
    # run must never take its own namespace for unused
    expiring = store is not None and _namespace(store)
    if expiring:  # namespaces of old code, old library versions, old column declarations
        counts["expired_namespaces"] = len(remove_unused(root))

    def one(batch: str, folder) -> bool:
        """Batch ``batch``'s statistics into ``stats`` (if it has rows) or its failure into
        ``unreadable``; whether it counts towards the window (an export of no rows does not)."""
        files = grouped[batch]
        if isinstance(folder, OSError):
            unreadable.append(f"{files[0].name}: cannot be read: {folder}")
            return True

        def read():
            return batch_stats(batch, _chunks(layout.raw, files, text_columns, spec.chunk_rows()), spec)

        if folder is not None and (folder / "summary.json").exists():
            _use(folder)  # before it is loaded: no run removes it from here on
            try:
                found = _load(folder, batch, read)
                counts["stored"] += 1
                if found.rows:
                    stats.append(found)
                return bool(found.rows)
            except Exception as error:  # read the batch again
                _unusable(folder, batch, "statistics", error)
        try:
            found = read()
        except ValueError as error:
            unreadable.append(str(error))
            return True
        counts["read"] += 1
        counts["rows_read"] += found.rows
        if folder is not None:
            _store(folder, found)
            _use(folder)
            try:  # the stored copy from now on (keys memory-mapped, the sample read when used): the
                # first run over a long history holds one batch's rows at a time, not all of them
                found = _load(folder, batch, read)
            except Exception:
                pass
        if found.rows:  # an export of no rows adds nothing
            stats.append(found)
        return bool(found.rows)

    # newest first, until ``window`` batches with rows are in: an empty export inside the window
    # must not leave the oldest recent batch without the batches it is compared with
    pending, taken = sorted(grouped), 0
    while pending and (window is None or taken < window):
        step = len(pending) if window is None else min(len(pending), window - taken)
        part, pending = pending[-step:], pending[:-step]
        entries = _entries(store, layout.raw, {batch: grouped[batch] for batch in part})
        taken += sum(one(batch, entries.get(batch)) for batch in part)
    counts["older"] = len(pending)
    if expiring:  # entries of batches no run reads any more (temporary folders of killed runs too, uncounted)
        counts["expired"] = sum(not name.startswith(".") for name in remove_unused(store))
    stats.sort(key=lambda s: s.batch)
    return stats, unreadable, counts
