"""Small file helpers shared by the stages: every output is written to a temporary
name and renamed into place, so a killed stage never leaves a half-written file
under the name the next stage reads."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")
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


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _remove_orphans(path: Path) -> None:
    """Temporaries of ``path`` left by a process that was killed (its pid is gone): they are
    never read, but a half-written copy of a large output should not keep its disk space."""
    for stale in path.parent.glob(f".{path.name}.tmp-{_HOST}-*"):  # another host's pids mean nothing here
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process. A zombie counts as dead: a stage killed with
    its process group is reparented to pid 1, and where pid 1 is not a reaping init (a
    container's or VM's entry point) it stays a zombie for good, so ``kill(pid, 0)``
    alone would keep its half-written temporaries forever."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ")"
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # the process ended in between, or there is no /proc (macOS)
        return not Path("/proc").is_dir()
    return state not in ("Z", "X")


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
