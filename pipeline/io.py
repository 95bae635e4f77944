"""Small file helpers shared by the stages: every output is written to a temporary
name and renamed into place, so a killed stage never leaves a half-written file
under the name the next stage reads."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path``."""
    from pipeline.process import HOST  # not at the top: pipeline.process imports this module's StageError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir():
            if path.exists():
                shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _remove_orphans(path: Path) -> None:
    """Temporaries of ``path`` left by a process that was killed (its pid is gone): they are
    never read, but a half-written copy of a large output should not keep its disk space."""
    from pipeline.process import HOST, alive

    for stale in path.parent.glob(f".{path.name}.tmp-{HOST}-*"):  # another host's pids mean nothing here
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class StageError(RuntimeError):
    """A stage cannot go on; the CLI prints the message and exits non-zero."""


class DataError(StageError):
    """The data (or what training made of it) is unusable: running again would fail the
    same way, so schedulers must not retry. The CLI exits with EXIT_DATA_ERROR."""


EXIT_DATA_ERROR = 4
