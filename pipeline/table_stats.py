"""The per-batch statistics of a table snapshot, stored so that a night reads only its own rows.

validate streams each batch of the raw snapshot through components/table_stats.py once and
stores what it found beside the decoded-image cache, in the DVC cache the workspace uses
(``Layout.table_stats_cache``: shared by every run workspace of a project; `dvc gc` leaves it
alone). A batch is found there by the sha256 of its files' contents, under a namespace that
hashes everything that changes the statistics (the declared columns and their types, the key
and label, ``table.rows_per_batch``, the code of components/table_stats.py and
components/tables.py, pandas' version): a stored batch can only be the statistics of those
very bytes. A file's content hash is itself remembered by (path, size, mtime), as git's
index does, so an unchanged file is not even hashed again in a workspace where ingest copied
it (ingest keeps each file's mtime).

The store is an optimisation: an entry that cannot be read is computed again (with a
warning), and one that cannot be written costs a warning, never the stage. Entries are
written into a temporary folder and renamed into place, so runs at once never see a
half-written one."""
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

from pipeline.layout import Layout

STORE_FORMAT = 1
CACHE_ENV = "ANOMALY_PIPELINE_TABLE_STATS_CACHE"  # "off": neither read nor write (benchmarks, debugging)


def _warn(message: str) -> None:
    print(f"validate: {message}", file=sys.stderr, flush=True)


def namespace(spec) -> str:
    import components.table_stats as stats_code
    import components.tables as tables_code

    code = hashlib.sha256()
    for module in (stats_code, tables_code):
        code.update(Path(module.__file__).read_bytes())
    inputs = {"format": STORE_FORMAT, "spec": spec.as_dict(), "code": code.hexdigest(), "pandas": pd.__version__}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _content_hash(path: Path, name: str, hashes: Path | None) -> str:
    """The file's sha256, remembered in ``hashes`` by its ``name`` in the snapshot, size and
    mtime (the same in every workspace ingest copied it into)."""
    info = path.stat()
    memo = None
    if hashes is not None:
        token = hashlib.sha256(f"{name}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()
        memo = hashes / token[:2] / token
        try:
            known = memo.read_text().strip()
            if len(known) == 64:
                return known
        except OSError:
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            temporary = memo.with_name(f".{memo.name}.{uuid.uuid4().hex}")
            temporary.write_text(value)
            os.replace(temporary, memo)
        except OSError:
            pass
    return value


def _load(folder: Path, batch: str):
    from components.table_stats import BatchStats

    summary = json.loads((folder / "summary.json").read_text())
    hashes = np.load(folder / "keys.npy", mmap_mode="r")  # read only where keys are compared (recent batches)
    if not (folder / "sample.parquet").is_file():
        raise FileNotFoundError(folder / "sample.parquet")
    return BatchStats(batch, summary, hashes, load_sample=lambda: pd.read_parquet(folder / "sample.parquet"))


def _store(folder: Path, stats) -> None:
    temporary = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    try:
        temporary.mkdir(parents=True)
        (temporary / "summary.json").write_text(json.dumps(stats.summary))
        np.save(temporary / "keys.npy", stats.key_hashes)
        stats.sample.to_parquet(temporary / "sample.parquet", index=False)
        os.rename(temporary, folder)
    except OSError as error:
        if not folder.is_dir():  # another run storing the same batch at once is no problem
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


def snapshot_stats(layout: Layout, spec, text_columns: tuple[str, ...]) -> tuple[list, list[str], dict]:
    """(the statistics of every batch of the raw snapshot with rows, in batch order; the files
    that could not be read, each with its reason; what was read and what was stored)."""
    from components.table_stats import batch_stats
    from components.tables import batch_files

    root = layout.table_stats_cache
    if os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        root = None
    store = hashes = None
    if root is not None:
        store, hashes = root / namespace(spec), root / "content-hashes"
    grouped: dict[str, list[Path]] = {}
    for batch, path in batch_files(layout.raw):
        grouped.setdefault(batch, []).append(path)
    stats, unreadable, counts = [], [], {"batches": len(grouped), "read": 0, "stored": 0, "rows_read": 0}
    for batch, files in sorted(grouped.items()):
        folder = None
        if store is not None:
            try:
                names = [p.relative_to(layout.raw).as_posix() for p in files]
                identity = "\0".join([batch, *(f"{n}\0{_content_hash(p, n, hashes)}" for p, n in zip(files, names))])
                folder = store / hashlib.sha256(identity.encode()).hexdigest()
            except OSError as error:
                unreadable.append(f"{files[0].name}: cannot be read: {error}")
                continue
            if (folder / "summary.json").exists():
                try:
                    found = _load(folder, batch)
                    counts["stored"] += 1
                    if found.rows:
                        stats.append(found)
                    continue
                except Exception as error:  # a damaged entry: read the batch again
                    _warn(f"the stored statistics of batch {batch} cannot be read ({error}); reading the batch")
                    shutil.rmtree(folder, ignore_errors=True)
        try:
            found = batch_stats(batch, _chunks(layout.raw, files, text_columns, spec.chunk_rows()), spec)
        except ValueError as error:
            unreadable.append(str(error))
            continue
        counts["read"] += 1
        counts["rows_read"] += found.rows
        if folder is not None:
            _store(folder, found)
        if found.rows:  # an export of no rows adds nothing
            stats.append(found)
    return stats, unreadable, counts
