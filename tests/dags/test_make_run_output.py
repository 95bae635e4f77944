"""What ``make run`` prints (``python -m pipeline.progress``): one line per task as it ends,
the summary once, Airflow's whole log in a file whose path is printed; on failure the
failed task's last lines and a non-zero exit; Ctrl-C stops airflow and all it started.

Each test has its own scratch project (no order between them).
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TASKS = ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate", "register", "promote")
LOW_GATES = {"gates": {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}}
TASK_LINE = re.compile(r"^  (\w+) +(success|failed|skipped|upstream_failed|up_for_retry)\b( +\d+\.\d s)?")


def start(ws: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.progress", *args], cwd=ws, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def task_lines(lines: list[str]) -> list[tuple[str, str, bool]]:
    """(task, state, has seconds) for each task line."""
    return [(m[1], m[2], bool(m[3])) for m in map(TASK_LINE.match, lines) if m]


def log_path(ws: Path, lines: list[str]) -> Path:
    [path] = {m[1] for line in lines for m in [re.search(r"full Airflow log: (\S+)", line)] if m}
    return ws / path


def test_a_run_prints_a_line_per_task_as_it_ends_the_summary_once_and_where_the_log_is(tmp_path):
    ws = make_workspace(tmp_path / "project", LOW_GATES)
    process = start(ws)
    lines, running_at_first_task = [], None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if running_at_first_task is None and task_lines(lines[-1:]):
            running_at_first_task = process.poll() is None
    assert process.wait(timeout=900) == 0, "\n".join(lines)
    output = "\n".join(lines)
    assert running_at_first_task, output  # progress comes while the run goes on, not at its end
    assert [(t, s) for t, s, _ in task_lines(lines)] == [(t, "success") for t in TASKS], output
    assert all(seconds for _, _, seconds in task_lines(lines)), output
    assert output.count("retraining summary") == 1 and "champion     v1 is now the champion" in output, output
    assert len(lines) < 40, output
    log = log_path(ws, lines)
    assert log.is_relative_to(ws / ".airflow" / "logs") and log.name in lines[0]
    airflow_log = log.read_text()
    assert "[DAG TEST] starting task_id=ingest" in airflow_log and "DagRun Finished" in airflow_log
    assert "Running stage 'train'" in airflow_log and "Running stage" not in output


def test_a_failed_task_prints_its_last_lines_and_the_run_exits_non_zero(tmp_path):
    ws = make_workspace(tmp_path / "project", LOW_GATES)
    (ws / "data" / "landing" / "batch-0001" / "good" / "zero_bytes.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "pipeline.progress"], cwd=ws, env=clean_env(),
                            capture_output=True, text=True, timeout=900)
    lines = result.stdout.splitlines()
    assert result.returncode != 0, result.stdout + result.stderr
    states = dict((t, s) for t, s, _ in task_lines(lines))
    assert states["ingest"] == "success" and states["validate"] == "failed", result.stdout
    assert all(states[t] == "upstream_failed" for t in TASKS[2:]), result.stdout
    start_ = lines.index("--- the last lines of task validate ---")
    tail = lines[start_ + 1:lines.index("---", start_)]
    assert 0 < len(tail) <= 30
    assert "validate refused the data" in "\n".join(tail) and "zero_bytes.png" in "\n".join(tail)
    assert "Running stage 'ingest'" not in "\n".join(tail)  # the failed task's part only
    assert not any(line.startswith(("Traceback", "  File ")) for line in tail)  # its exception line, not frames
    assert result.stdout.count("retraining summary") == 1 and "stopped at validate" in result.stdout
    assert "failed (exit" in lines[-1] and log_path(ws, lines).is_file()


def test_ctrl_c_stops_airflow_and_everything_it_started(tmp_path):
    import psutil

    ws = make_workspace(tmp_path / "project", LOW_GATES)
    process = start(ws, "-c", '{"epochs": 1000}')  # train runs until stopped
    first = process.stdout.readline()
    log = ws / re.search(r"the full log goes to (\S+)", first)[1]
    deadline = time.monotonic() + 300
    while "Running stage 'train'" not in log.read_text() and process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
    time.sleep(2)  # into training, past the stage's start
    children = psutil.Process(process.pid).children(recursive=True)
    assert any("train" in " ".join(p.cmdline()) for p in children), [p.cmdline() for p in children]
    began = time.monotonic()
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = first + rest
    assert process.returncode != 0, output
    assert "got SIGINT: stopping airflow dags test" in output
    # train has retries: the first SIGINT stops the stage, the second ends dags test's wait for the retry
    assert re.search(r"^  train +up_for_retry", output, re.M) and time.monotonic() - began < 30, output
    assert "--- the last lines of task train ---" in output and "Interrupted: got SIGINT" in output
    assert "retraining summary" not in output  # there is none: the run was stopped, not finished
    _, left = psutil.wait_procs(children, timeout=5)
    # a zombie has ended: where pid 1 does not reap, a re-parented one stays one
    assert [p for p in left if p.status() != psutil.STATUS_ZOMBIE] == [], output
    assert "failed (exit" in output.splitlines()[-1], output
