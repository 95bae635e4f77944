"""runner.stream: what a task runs its stages through. Airflow 3 ends a task that runs past
its execution_timeout with an exception raised inside the task process (SIGALRM ->
AirflowTaskTimeout); the command's whole process tree must stop with it."""
from __future__ import annotations

import json
import signal
import sys
import time

import psutil
import pytest

from pipeline import runner

CHILD = r"""
import json, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(json.dumps({"child": __import__("os").getpid(), "grandchild": grandchild.pid}))
print("started", flush=True)
time.sleep(300)
"""


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TaskTimeout(Exception):
    """Stands in for airflow.exceptions.AirflowTaskTimeout (raised from a SIGALRM handler)."""


def test_an_exception_raised_in_the_task_stops_the_commands_whole_tree(tmp_path):
    pids = tmp_path / "pids.json"

    def timeout(signum, frame):
        raise TaskTimeout("execution_timeout")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)  # the fault itself: the task's timeout, as Airflow arms it
    try:
        with pytest.raises(TaskTimeout):
            runner.stream([sys.executable, "-c", CHILD, str(pids)], tmp_path, env=None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    started = json.loads(pids.read_text())
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in started.values()):
        assert time.monotonic() < deadline, f"still running after the task ended: {started}"
        time.sleep(0.1)
