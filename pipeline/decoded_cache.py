"""The decoded-image cache of preprocess (images only).

Decoded images are cached across runs, because nothing else survives from one run to the
next (each run works in a fresh workspace, and DVC deletes a stage's outputs before it
runs it): a nightly batch that adds 10 % more images decodes only those. The cache lives
in the DVC cache folder the workspace uses (shared by every run workspace of a project;
`dvc gc` leaves folders it does not know alone), under
``anomaly-preprocess/<namespace>/``, where the namespace is a hash of everything that
changes a decoded array: image_size, channels, the decoding limits, the source of
detector/decode.py and Pillow's version. A file is found there by its content's sha256
(the manifest's), so a cached row can only be the decoding of those very bytes.
Each run that decoded something appends one pack: ``<id>.pack.npy`` (uint8 N x C x S x S)
and ``<id>.keys.npy`` (the sha256 of each row), both written under temporary names,
synced and renamed (keys last: a pack is listed by its keys), so runs at once never see
each other's half-written packs. Past MAX_PACKS packs, a run merges them into one (one run
at a time: the others leave it to that one).
A namespace no run has used for 30 days is removed (pipeline/caches.py).
The cache is only an optimisation: a pack that vanished, is malformed or cannot be read
means decoding those files again (with a warning), and a cache that cannot be written
(a full disk, a read-only cache) costs a warning, never the stage. The output is the
same bytes whether its rows were decoded or read from the cache."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.decode import DecodeLimits
from pipeline.caches import MARK, remove_unused, switched_off
from pipeline.io import atomic_path
from pipeline.layout import Layout
from pipeline.process import HOST, alive

CACHE_FORMAT = 1             # the pack layout; a new one starts a new namespace
MAX_PACKS = 8                # more packs than this are merged into one
ORPHAN_PACK_AGE_S = 3600     # a pack's data this old with no keys beside it is a killed run's: removed
BUFFER_BYTES = 4 * 2**20     # rows are written and merged this many bytes at a time
KEY_DTYPE = "S64"            # a sha256 in hex, as the manifest holds it
CACHE_ENV = "ANOMALY_PIPELINE_PREPROCESS_CACHE"  # "off": neither read nor write the cache (benchmarks, debugging)

# OSErrors of a write that running again with the same disk cannot fix; said in words
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would exceed the file size limit (a full or size-capped disk, or ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way of a folder of that name",
}


def _warn(message: str) -> None:
    print(f"preprocess: {message}", file=sys.stderr, flush=True)


def _why(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return WRITE_FAILURES.get(error.errno) or f"[Errno {error.errno}] {error.strerror}"
    return str(error) or type(error).__name__


def cache_namespace(size: int, channels: int, limits: DecodeLimits) -> str:
    """The cache folder's name for these settings: a decoded array is reused only when
    every input of the decoding is the same (the decoder's source and Pillow included)."""
    import PIL

    from detector import decode as images

    decoder = hashlib.sha256(Path(images.__file__).read_bytes()).hexdigest()
    inputs = {"format": CACHE_FORMAT, "image_size": size, "channels": channels, **limits.as_dict(),
              "decoder": decoder, "pillow": PIL.__version__}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
    return f"{channels}x{size}x{size}-{digest}"


def _pread_exact(fd: int, count: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < count:
        chunk = os.pread(fd, count - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _remove_pack(keys_path: Path, data_path: Path) -> None:
    """Keys first: a pack is listed by its keys, so no listing finds keys without data."""
    for path in (keys_path, data_path):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


@dataclass
class _Pack:
    name: str
    keys_path: Path
    data_path: Path
    keys: list[bytes]
    fd: int
    offset: int


class PackWriter:
    """One new pack, filled row by row, published only when complete: data synced and renamed
    into place, then its keys (so listing by keys never finds a half pack). An OSError (a full
    disk, a read-only cache) abandons it with a warning: the cache is an optimisation."""

    def __init__(self, folder: Path, expected: set[bytes], shape: tuple[int, ...], what: str = "new images"):
        self.expected, self.what = expected, what
        self.keys: list[bytes] = []
        self.seen: set[bytes] = set()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        self.data_path, self.keys_path = folder / f"{name}.pack.npy", folder / f"{name}.keys.npy"
        self._context = None
        self._rows: Rows | None = None
        try:
            context = atomic_path(self.data_path)
            temporary = context.__enter__()
            self._context = context
            self._rows = Rows(temporary, len(expected), shape)
        except OSError as error:
            self.abandon(error)

    @property
    def alive(self) -> bool:
        return self._context is not None

    def put(self, key: bytes, row: np.ndarray) -> None:
        if not self.alive or key not in self.expected or key in self.seen:
            return
        try:
            self._rows.put(row)
        except OSError as error:
            self.abandon(error)
            return
        self.keys.append(key)
        self.seen.add(key)

    def abandon(self, error: BaseException, quiet: bool = False) -> None:
        if self._rows is not None:
            self._rows.discard()
            self._rows = None
        if self._context is not None:
            context, self._context = self._context, None
            try:  # the temporary is removed by atomic_path's own clean-up
                context.__exit__(type(error), error, error.__traceback__)
            except BaseException:  # noqa: BLE001 - the clean-up of an optimisation must not fail the stage
                pass
        if not quiet:
                _warn(f"cannot write the decoded-image cache ({self.what}) in {self.data_path.parent}: "
                  f"{_why(error)}; the stage goes on without it")

    def finish(self) -> bool:
        """Publish when every expected row is in; else abandon. True when published."""
        if not self.alive:
            return False
        if len(self.keys) != len(self.expected):
            self.abandon(ValueError(f"{len(self.expected) - len(self.keys)} of {len(self.expected)} rows missing "
                                    "(files whose bytes no longer match the manifest's sha256?)"))
            return False
        try:
            rows, self._rows = self._rows, None
            rows.close()
            with atomic_path(self.keys_path) as temporary:
                with open(temporary, "wb") as handle:
                    np.save(handle, np.array(self.keys, dtype=KEY_DTYPE), allow_pickle=False)
                    handle.flush()
                    os.fsync(handle.fileno())
                context, self._context = self._context, None
                context.__exit__(None, None, None)  # the data under its name first, then the keys
        except (OSError, ValueError) as error:
            if self._context is not None:
                self.abandon(error)
            else:
                _remove_pack(self.keys_path, self.data_path)
                _warn(f"cannot write the decoded-image cache ({self.what}) in {self.data_path.parent}: "
                      f"{_why(error)}; the stage goes on without it")
            return False
        return True


class DecodedCache:
    """The packs of one namespace, opened for reading (one file descriptor each, so a pack
    that another run removes after this listing can still be read), or a disabled cache."""

    def __init__(self, folder: Path | None, shape: tuple[int, ...]):
        self.folder, self.shape = folder, shape
        self.row_bytes = math.prod(shape)
        self.packs: list[_Pack] = []
        self.where: dict[bytes, tuple[int, int]] = {}
        self.broken: set[int] = set()
        self._block: tuple[int, int, np.ndarray] = (-1, 0, np.empty((0, *shape), np.uint8))  # read ahead
        self._last: tuple[int, int] = (-1, -1)

    @classmethod
    def open(cls, folder: Path | None, shape: tuple[int, ...]) -> "DecodedCache":
        cache = cls(folder, shape)
        if folder is None or not folder.is_dir():
            return cache
        cache._remove_orphans()
        for keys_path in sorted(folder.glob("*.keys.npy")):
            cache._add(keys_path)
        return cache

    def _remove_orphans(self) -> None:
        """Temporaries of killed runs on this host (their names are unique, so atomic_path's
        own clean-up of a name never meets them), and data files whose keys never came (a run
        killed between the two renames, which are milliseconds apart: after ORPHAN_PACK_AGE_S
        no live run is still writing those keys)."""
        for stale in self.folder.glob(".*.tmp-*"):
            host_pid = stale.name.rsplit(".tmp-", 1)[-1]
            host, _, pid = host_pid.rpartition("-")
            if host == HOST and pid.isdigit() and not alive(int(pid)):
                try:
                    stale.unlink()
                except OSError:
                    pass
        horizon = time.time() - ORPHAN_PACK_AGE_S
        for data_path in self.folder.glob("*.pack.npy"):
            keys_path = data_path.with_name(data_path.name[:-len(".pack.npy")] + ".keys.npy")
            try:
                if not keys_path.exists() and data_path.stat().st_mtime < horizon:
                    data_path.unlink()
                    _warn(f"removed {data_path.name}: a cache pack whose keys were never written (a killed run)")
            except OSError:
                pass

    def _add(self, keys_path: Path) -> None:
        name = keys_path.name[:-len(".keys.npy")]
        data_path = keys_path.with_name(f"{name}.pack.npy")
        try:
            fd = os.open(data_path, os.O_RDONLY)
        except FileNotFoundError:
            _warn(f"cache pack {name} vanished (merged by another run?); its images are decoded again")
            return
        except OSError as error:
            _warn(f"cannot open cache pack {name}: {_why(error)}; its images are decoded again")
            return
        problem = None
        try:
            keys = np.load(keys_path, allow_pickle=False)
            with os.fdopen(os.dup(fd), "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(handle)
                offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
            if keys.dtype != np.dtype(KEY_DTYPE) or keys.ndim != 1:
                problem = f"keys are {keys.dtype} {keys.shape}"
            elif tuple(shape) != (len(keys), *self.shape) or fortran or dtype != np.uint8:
                problem = f"rows are {dtype} {tuple(shape)}{' (Fortran order)' if fortran else ''}, " \
                          f"expected uint8 {(len(keys), *self.shape)}"
            elif size != offset + len(keys) * self.row_bytes:
                problem = f"{size} bytes, expected {offset + len(keys) * self.row_bytes}"
        except FileNotFoundError:
            os.close(fd)
            _warn(f"cache pack {name} vanished (merged by another run?); its images are decoded again")
            return
        except OSError as error:
            os.close(fd)
            _warn(f"cannot read cache pack {name}: {_why(error)}; its images are decoded again")
            return
        except (ValueError, EOFError) as error:
            problem = str(error) or type(error).__name__
        if problem is not None:
            os.close(fd)
            _remove_pack(keys_path, data_path)  # published complete and synced: malformed for good
            _warn(f"cache pack {name} is malformed ({problem}): removed; its images are decoded again")
            return
        index = len(self.packs)
        key_list = keys.tolist()
        self.packs.append(_Pack(name, keys_path, data_path, key_list, fd, offset))
        for row, key in enumerate(key_list):
            self.where.setdefault(key, (index, row))

    def has(self, key: bytes) -> bool:
        found = self.where.get(key)
        return found is not None and found[0] not in self.broken

    def read(self, key: bytes) -> np.ndarray | None:
        """The cached row of this content, or None (not cached, or its pack cannot be read).

        Rows asked for in the pack's own order (a snapshot that grew by new files: its old
        files come in the order the pack was written) are read ahead a buffer at a time."""
        found = self.where.get(key)
        if found is None or found[0] in self.broken:
            return None
        index, row = found
        block_index, first, block = self._block
        if block_index == index and first <= row < first + len(block):
            self._last = found
            return block[row - first]
        pack = self.packs[index]
        count = 1
        if self._last == (index, row - 1):
            count = max(1, min(BUFFER_BYTES // self.row_bytes, len(pack.keys) - row))
        try:
            data = _pread_exact(pack.fd, count * self.row_bytes, pack.offset + row * self.row_bytes)
        except OSError as error:
            data, why = b"", _why(error)
        else:
            why = "the file is shorter than its header says"
        if len(data) != count * self.row_bytes:
            self.broken.add(index)
            _warn(f"cannot read cache pack {pack.name}: {why}; its images are decoded again")
            return None
        block = np.frombuffer(data, np.uint8).reshape(count, *self.shape)
        self._block, self._last = (index, row, block), found
        return block[0]

    def close(self) -> None:
        for pack in self.packs:
            try:
                os.close(pack.fd)
            except OSError:
                pass
        self.packs, self.where = [], {}

    def compact(self) -> bool:
        """Merge every pack into one when there are more than MAX_PACKS (streaming, a buffer
        at a time; every distinct key is kept). True when it merged."""
        packs = [pack for index, pack in enumerate(self.packs) if index not in self.broken]
        if self.folder is None or len(packs) <= MAX_PACKS:
            return False
        writer = PackWriter(self.folder, set(self.where), self.shape, what=f"merging {len(packs)} packs")
        step = max(1, BUFFER_BYTES // self.row_bytes)
        for pack in packs:
            for start in range(0, len(pack.keys), step):
                if not writer.alive:
                    return False
                count = min(step, len(pack.keys) - start)
                try:
                    data = _pread_exact(pack.fd, count * self.row_bytes, pack.offset + start * self.row_bytes)
                except OSError as error:
                    writer.abandon(error)
                    return False
                if len(data) != count * self.row_bytes:
                    writer.abandon(ValueError(f"pack {pack.name} is shorter than its header says"))
                    return False
                block = np.frombuffer(data, np.uint8).reshape(count, *self.shape)
                for key, row in zip(pack.keys[start:start + count], block):
                    writer.put(key, row)
        if not writer.finish():
            return False
        for pack in packs:
            _remove_pack(pack.keys_path, pack.data_path)
        print(f"preprocess: merged {len(packs)} cache packs into one ({len(writer.keys)} images)")
        return True


def compact(folder: Path, shape: tuple[int, ...]) -> None:
    """Merge the packs when there are too many, one run at a time: under an exclusive lock
    taken without waiting (a run that finds another merging leaves it to that one), and
    listing the packs only once the lock is held, so two runs never merge the same packs."""
    import fcntl

    if len(list(folder.glob("*.keys.npy"))) <= MAX_PACKS:  # most nights: no need to read every key again
        return
    try:
        lock = open(folder / ".compact.lock", "a")
    except OSError as error:
        _warn(f"cannot merge the cache packs in {folder}: {_why(error)}")
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        merged = DecodedCache.open(folder, shape)  # compact() counts again: another run may have merged
        try:
            merged.compact()
        finally:
            merged.close()


def cache_folder(layout: Layout, size: int, channels: int, limits: DecodeLimits) -> Path | None:
    """This run's namespace folder (None outside a DVC repository); marks it used and removes
    the namespaces no run has used for caches.TTL_DAYS (old sizes, old decoders)."""
    root = layout.preprocess_cache
    if root is None or switched_off(CACHE_ENV):
        return None
    folder = root / cache_namespace(size, channels, limits)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARK).touch()
    except OSError as error:
        _warn(f"cannot use the decoded-image cache in {root}: {_why(error)}; every image is decoded")
        return folder if folder.is_dir() else None
    remove_unused(root)
    return folder


class Rows:
    """A uint8 .npy of ``count`` rows written in order through a small buffer, so the
    resident memory stays a few MB at any count. Its header is numpy's own (open_memmap),
    and every block is reserved up front (posix_fallocate), so a full disk fails here, at
    the start, with ENOSPC."""

    def __init__(self, path: Path, count: int, shape: tuple[int, ...]):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, *shape))
        offset = array.offset
        del array
        self.handle = open(path, "r+b")
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.handle.fileno(), 0, os.fstat(self.handle.fileno()).st_size)
            self.handle.seek(offset)
        except BaseException:
            self.handle.close()
            raise
        self.count = count
        self.buffer = np.empty((max(1, min(count, BUFFER_BYTES // max(1, math.prod(shape)))), *shape), np.uint8)
        self.filled = self.written = 0

    def put(self, row: np.ndarray) -> None:
        if self.written + self.filled >= self.count:
            raise ValueError(f"more than {self.count} rows")
        self.buffer[self.filled] = row
        self.filled += 1
        if self.filled == len(self.buffer):
            self._flush()

    def _flush(self) -> None:
        if self.filled:
            self.handle.write(memoryview(self.buffer[:self.filled]).cast("B"))
            self.written += self.filled
            self.filled = 0

    def close(self) -> None:
        """Write what is buffered, sync to disk (before any rename makes the file visible)."""
        try:
            self._flush()
            if self.written != self.count:
                raise ValueError(f"{self.written} rows written of {self.count}")
            self.handle.flush()
            os.fsync(self.handle.fileno())
        finally:
            self.handle.close()

    def discard(self) -> None:
        try:
            self.handle.close()
        except OSError:
            pass
