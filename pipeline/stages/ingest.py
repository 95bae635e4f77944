"""ingest: snapshot the landing folder into the DVC-tracked raw folder.

The raw folder's DVC hash (in dvc.lock) is the data version recorded with every model.

What is read, and what is refused (issue 19): the landing folder must lie in one of
``data.allowed_roots`` (checked here as well as when params are loaded). Inside it, a
symbolic link is followed only when its target lies in the landing folder too: a link to
another file or folder of the landing data is copied as what it points to (the snapshot
holds plain files and folders only, never a link). Refused by name, and nothing is copied:
a link that leaves the landing folder (``good/passwd.png -> /etc/passwd``, a batch folder
linked to ``/etc``), a dangling link, a folder link to its own ancestor (a loop), and anything
that is not a plain file or folder (a FIFO would block the copy forever). These are data
errors: a retry would fail the same way. Every path is checked before the first byte is
copied, and each file is opened without following a last-moment link (``O_NOFOLLOW``).
Hidden names (``.*``: half-written ``.partial`` batches) are skipped, as before.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from pipeline.config import ConfigError, landing_folder
from pipeline.io import DataError, StageError, atomic_path
from pipeline.layout import Layout


def _plan(landing: Path) -> tuple[list[str], list[tuple[Path, str]], list[str]]:
    """(folders, (source, relpath) files, problems) of the landing folder, links resolved."""
    folders: list[str] = []
    files: list[tuple[Path, str]] = []
    problems: list[str] = []

    def walk(folder: Path, relative: str, ancestors: tuple[Path, ...]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            rel = f"{relative}/{entry.name}" if relative else entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                target = path.resolve()
                shown = f"{rel} -> {target}"
                if not target.exists():
                    problems.append(f"{shown}: a dangling link (its target does not exist)")
                    continue
                if not target.is_relative_to(landing):
                    problems.append(f"{shown}: a link that leaves the landing folder {landing}; not read")
                    continue
                if target.is_dir() and target in ancestors:
                    problems.append(f"{shown}: a loop (the link points to a folder that holds it)")
                    continue
                mode = target.stat().st_mode
            else:
                target = path
                mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                folders.append(rel)
                walk(target, rel, (*ancestors, target))
            elif stat.S_ISREG(mode):
                files.append((target, rel))
            else:
                problems.append(f"{rel}: not a plain file or folder (a FIFO, socket or device); not read")

    walk(landing, "", (landing,))
    return folders, files, problems


def _copy(source: Path, target: Path) -> None:
    """A plain file's bytes, mode and times; a link put in its place since the check is not followed."""
    descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as reader:
        info = os.fstat(reader.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"ingest: {source} changed while it was copied (no longer a plain file); run again")
        with open(target, "wb") as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
    os.chmod(target, stat.S_IMODE(info.st_mode))
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))


def scan(layout: Layout) -> tuple[Path, list[str], list[tuple[Path, str]]]:
    """The landing folder checked as the module's docstring says, without reading a byte of a
    file: (landing, folders, (source, relpath) files), or a StageError / DataError naming every
    refused path. Cheap (one lstat per entry), so a caller may run it before ``dvc repro``,
    whose hashing of the landing dependency reads every file a link points to and would block
    on a FIFO, before this stage ever runs."""
    try:
        landing = landing_folder(layout.config, layout.root)
    except ConfigError as error:
        raise StageError(str(error).replace("invalid params:\n  ", "")) from None
    if not landing.is_dir():
        raise StageError(f"data.landing: folder does not exist: {layout.landing}")
    try:
        folders, sources, problems = _plan(landing)
    except OSError as error:  # an unreadable folder, a share that went away: a retry may help
        raise StageError(f"ingest: cannot read the landing folder {landing}: {error}") from None
    if problems:
        raise DataError(f"ingest: refused {len(problems)} path(s) in the landing folder {landing} (nothing was "
                        "copied; remove or replace them):\n" + "\n".join(f"  {p}" for p in problems))
    return landing, folders, sources


def run(layout: Layout) -> dict:
    landing, folders, sources = scan(layout)
    with atomic_path(layout.raw) as tmp:
        tmp.mkdir()
        for rel in folders:
            (tmp / rel).mkdir()
        for source, rel in sources:
            _copy(source, tmp / rel)
    files = [p for p in layout.raw.rglob("*") if p.is_file()]
    batches = sorted(p.name for p in layout.raw.iterdir() if p.is_dir())
    print(f"ingest: {len(files)} files from {landing} -> {layout.raw} ({len(batches)} folders: {', '.join(batches[:8])}"
          f"{' ...' if len(batches) > 8 else ''})")
    return {"files": len(files)}
