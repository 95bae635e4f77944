"""process.stream: what the CLI run and every task run their stages through. Airflow 3 ends a task that runs past
its execution_timeout with an exception raised inside the task process (SIGALRM ->
AirflowTaskTimeout); the command's whole process tree must stop with it."""
from __future__ import annotations

import json
import signal
import sys
import time

import psutil
import pytest

from pipeline import process, steps
from pipeline.io import EXIT_DATA_ERROR

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
            process.stream([sys.executable, "-c", CHILD, str(pids)], tmp_path, env=None)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    started = json.loads(pids.read_text())
    deadline = time.monotonic() + 15
    while any(_running(pid) for pid in started.values()):
        assert time.monotonic() < deadline, f"still running after the task ended: {started}"
        time.sleep(0.1)


# the end of what `dvc repro` prints when a stage exits non-zero (DVC 3: the stage's own
# "error:" line, then ReproductionError caused by StageCmdFailedError)
DVC_FAILED = """Running stage 'validate':
> python -m pipeline validate
error: validate refused 3 files: see data/validation/report.html
ERROR: failed to reproduce 'validate': failed to run: python -m pipeline validate, exited with 4
"""


def test_a_failed_dvc_repro_is_read_the_same_way_by_the_cli_run_and_the_tasks():
    """One reading of dvc's failure for both drivers: the stage, its exit code and its own error
    line; a refusal of the data (EXIT_DATA_ERROR) is the CLI's exit 4 and a task's no-retry."""
    assert process.dvc_failure(DVC_FAILED) == ("validate", 4, "validate refused 3 files: see "
                                               "data/validation/report.html")
    refused = steps.ReproFailed(1, DVC_FAILED)
    assert refused.refused_data and refused.exit_code == EXIT_DATA_ERROR and refused.stage == "validate"

    killed = steps.ReproFailed(1, DVC_FAILED.replace("exited with 4", "exited with -9").replace("error: ", "? "))
    assert (killed.stage_code, killed.refused_data, killed.exit_code) == (-9, False, 1)
    assert killed.message == DVC_FAILED.strip().splitlines()[-1].replace("exited with 4", "exited with -9")
