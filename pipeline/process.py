"""The child processes the pipeline runs (``dvc repro``, ``dvc push``), in one place: start a
command and stream its scrubbed output, turn SIGTERM/SIGINT into an exception while it runs,
stop its whole process tree, tell whether a pid still runs, and read what ``dvc repro`` says
when a stage failed. The CLI's whole run (pipeline.runner) and each Airflow task
(pipeline.orchestrate) go through here, and pipeline.io / pipeline.decoded_cache use ``alive``
and ``HOST`` to tell a killed writer's temporaries from a running one's.

Light on purpose (standard library; psutil only inside ``stop_tree``): every Airflow task imports it.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from pipeline import dvc_cli
from pipeline.io import StageError

# This host's name as it goes into a temporary's name (next to the writer's pid): another
# host's pids (a shared disk) mean nothing here.
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"

# SIGINT, then SIGTERM, then SIGKILL to the child tree: DVC ignores SIGINT while its stage
# runs and reports the stage's exit, so the first is the clean one. Together they stay
# under the 5 s Airflow's supervisor waits before it SIGKILLs the task's process group.
STOP_STEPS = ((signal.SIGINT, 2.0), (signal.SIGTERM, 1.5), (signal.SIGKILL, 5.0))


class Interrupted(StageError):
    """This process got SIGTERM or SIGINT (Airflow's execution_timeout or a task marked
    failed, a node draining, Ctrl-C) while a child ran; the child's whole tree was stopped."""


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process. A zombie counts as dead: a stage killed with
    its process group is reparented to pid 1, and where pid 1 is not a reaping init (a
    container's or VM's entry point) it stays a zombie for good, so ``kill(pid, 0)``
    alone would keep its half-written temporaries forever (and ``stop_tree`` waiting)."""
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


STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # the signals that mean "stop, and your children"


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGINT (and SIGHUP: a closed terminal or a lost ssh session) raise Interrupted
    here, so the caller can stop its children first.

    Without this a SIGTERM kills only this process and ``dvc repro`` and the stage it runs
    go on as orphans (training for hours, holding DVC's lock). A previous Python SIGTERM
    handler (Airflow's task runner calls the operator's on_kill) still runs first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOPPING}

    def handler(signum, frame):
        before = previous[signum]
        if signum == signal.SIGTERM and callable(before):
            before(signum, frame)
        raise Interrupted(f"got {signal.Signals(signum).name}")

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """SIGTERM/SIGINT do nothing here: a second Ctrl-C must not cut a clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOPPING}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def stop_tree(process: subprocess.Popen) -> None:
    """Stop a child and every process under it (dvc -> the stage -> its workers), escalating.

    The tree is read before the first signal: once dvc exits, its stage is re-parented and
    could no longer be found under it.
    """
    import psutil

    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig, grace in STOP_STEPS:
        with suppress(psutil.NoSuchProcess):
            tree += [p for p in psutil.Process(process.pid).children(recursive=True) if p not in tree]
        living = [p for p in tree if alive(p.pid)]
        if not living:
            break
        for p in living:
            with suppress(psutil.NoSuchProcess):
                p.send_signal(sig)  # psutil refuses a pid that a new process took meanwhile
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p.pid) for p in living):
            if process.poll() is None:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=0.05)  # reaps the direct child; the others are polled
            else:
                time.sleep(0.05)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=1)


def stream(command: list[str], cwd: Path, env: dict[str, str] | None, merge: bool = True) -> tuple[int, str]:
    """Run a command, echoing its output line by line (stdout and stderr together when
    ``merge``, else only stderr is piped and echoed to ours), and return (exit code, tail).

    If this process is signalled or interrupted (SIGTERM, SIGINT, Airflow's timeout
    exception) while the command runs, the command's whole process tree is stopped
    before the exception goes on, so no stage outlives the task that started it.

    Each line is scrubbed (pipeline.secrets) before it is echoed or kept: a stage's
    MLflow error names the tracking URL, and a password in it would reach the task's log.
    """
    from pipeline.secrets import literals, scrub

    tail: deque[str] = deque(maxlen=80)
    out = sys.stdout if merge else sys.stderr
    known = literals({**os.environ, **(env or {})})
    with signals_raise():
        process = None
        try:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE if merge else None,
                                       stderr=subprocess.STDOUT if merge else subprocess.PIPE, text=True,
                                       bufsize=1, errors="replace")
            pipe = process.stdout if merge else process.stderr
            for line in pipe:
                line = scrub(line, known)
                print(line, end="", file=out, flush=True)
                tail.append(line)
            process.wait()
        except BaseException as error:
            if process is not None:
                with signals_ignored():
                    stop_tree(process)
            if isinstance(error, Interrupted):
                raise Interrupted(f"{error} while running '{shown(command)}'; it and its child processes were "
                                  "stopped") from None
            raise
        finally:
            if process is not None:
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
    return process.returncode, "".join(tail)


def shown(command: list[str]) -> str:
    """A command as a person would type it: ``dvc repro …``, not the interpreter and its -c script."""
    if command[:len(dvc_cli.COMMAND)] == dvc_cli.COMMAND:
        return " ".join(["dvc", *command[len(dvc_cli.COMMAND):]])
    return " ".join(command[2:] if command[1:2] == ["-m"] else command)


def dvc_failure(tail: str) -> tuple[str | None, int | None, str]:
    """From ``dvc repro``'s output: the stage that failed, its exit code, and its own error line."""
    stages = re.findall(r"failed to reproduce '([^']+)'", tail)
    codes = re.findall(r"exited with (-?\d+)", tail)
    errors = [line[len("error: "):].strip() for line in tail.splitlines() if line.startswith("error: ")]
    return (stages[-1] if stages else None, int(codes[-1]) if codes else None,
            errors[-1] if errors else (tail.strip().splitlines() or [""])[-1])


# Stopping a whole process group (``make run``'s ``airflow dags test``, started in a session of its
# own): the first SIGINT reaches the running task (it stops its stage and fails, recording it, or
# goes up_for_retry); once no task runs, the second ends ``dags test`` itself, which otherwise
# waits out the retry delay; SIGTERM and SIGKILL follow if it is still there. The most seconds
# to wait after each.
GROUP_STOP_STEPS = ((signal.SIGINT, 30.0), (signal.SIGINT, 10.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


def stop_group(child: subprocess.Popen, settled, steps=GROUP_STOP_STEPS) -> None:
    """Stop ``child`` and everything in its process group, escalating; after the first signal,
    the next comes once ``settled()`` is true (nothing left mid-work) or after the grace."""
    for step, (sig, grace) in enumerate(steps):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                child.wait(timeout=0.5)
                return
            except subprocess.TimeoutExpired:
                if step == 0 and settled():
                    break
