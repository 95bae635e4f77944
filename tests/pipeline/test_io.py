"""pipeline.io's atomic writes: a killed writer's temporaries are removed by the next
writer, a running writer's are left alone."""
from __future__ import annotations

import os
import subprocess
import sys

from pipeline import io, process


def _temporary_of(target, pid: int):
    stale = target.with_name(f".{target.name}.tmp-{process.HOST}-{pid}")
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"half written")
    return stale


def test_a_zombie_writers_temporaries_are_removed_and_a_running_writers_kept(tmp_path):
    """A stage killed with its process group is reparented to pid 1; where pid 1 does not
    reap (this VM's /process_api, a container's entry point) it stays a zombie, which
    ``kill(pid, 0)`` still reports as there. Its temporaries must go all the same."""
    target = tmp_path / "processed"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        # wait for the exit without reaping it: the child is now a zombie, as the killed stage was
        os.waitid(os.P_PID, finished.pid, os.WEXITED | os.WNOWAIT)
        os.kill(finished.pid, 0)  # the zombie still answers the signal-0 probe
        zombie_tmp, running_tmp = _temporary_of(target, finished.pid), _temporary_of(target, running.pid)

        with io.atomic_path(target) as tmp:
            tmp.mkdir()

        assert not zombie_tmp.exists(), "the zombie's half-written copy is removed"
        assert running_tmp.exists(), "a running writer's temporary is left alone"
        assert target.is_dir()
    finally:
        finished.wait(timeout=30)
        running.stdin.close()
        running.wait(timeout=30)
    assert not process.alive(finished.pid)
