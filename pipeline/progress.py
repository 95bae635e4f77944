"""``make run``: one DAG run through Airflow, shown as progress instead of Airflow's log.

``python -m pipeline.progress [dag_id] [-c CONF]`` runs ``airflow dags test`` on the
project-local AIRFLOW_HOME (pipeline.airflow_local) with its whole output (about 300 lines
of Airflow's structured log) written to a file, and prints one line per task as it
finishes (name, state, seconds), then the run's summary once (``python -m pipeline
summary``), then where the full log is. A failed task's last lines are printed from that
log. The exit status is ``airflow dags test``'s: non-zero when the run failed.

Task states come from Airflow's metadata database (the ``task_instance`` rows of the run
this command started), read while the run goes on, not from Airflow's log format. The
log's ``[DAG TEST] starting task_id=...`` lines only cut out a failed task's part.

Ctrl-C (SIGINT) or SIGTERM stops the run the way Ctrl-C on ``airflow dags test`` itself
would, to its whole process group (airflow, dvc, the stage): pipeline.process.stop_group. So
does SIGHUP (a closed terminal), and so does any error here (a broken pipe, a database error):
``airflow dags test`` runs in a session of its own, where nothing but this command can stop it.
"""
from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline import airflow_local, process

RETRAIN_DAG = "retrain_anomaly_detector"
# states a task instance ends a try in; up_for_retry is shown too, a retry can take long
SHOWN_STATES = ("success", "failed", "skipped", "upstream_failed", "removed", "up_for_retry")
TAIL_LINES = 30
POLL_SECONDS = 1.0


def database_url(environment: dict[str, str]) -> str:
    """The metadata database Airflow uses: the environment's setting, else airflow.cfg's, else its default."""
    url = environment.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if url:
        return url
    home = Path(environment["AIRFLOW_HOME"])
    config = configparser.ConfigParser(interpolation=None)
    config.read(home / "airflow.cfg")
    return config.get("database", "sql_alchemy_conn", fallback=f"sqlite:///{home / 'airflow.db'}")


class Runs:
    """Read-only queries on Airflow's metadata database: the newest run of a DAG and its task instances.
    Each query opens and closes its own connection, so no transaction stays open beside Airflow's writes."""

    def __init__(self, url: str, dag_id: str):
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self.engine, self.dag_id = create_engine(url, poolclass=NullPool), dag_id

    def _rows(self, sql: str, **params) -> list:
        from sqlalchemy import text
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self.engine.connect() as connection:
                return list(connection.execute(text(sql), {"dag_id": self.dag_id, **params}))
        except SQLAlchemyError:  # SQLite busy with Airflow's write, say: the next poll reads it
            return []

    def newest_id(self, attempts: int = 40) -> int:
        """The newest run's primary key (0: none yet). Read before our run starts, so it must be read:
        a failed read taken as 0 would follow the DAG's oldest run instead of ours."""
        for _ in range(attempts):
            rows = self._rows("SELECT max(id) FROM dag_run WHERE dag_id = :dag_id")
            if rows:  # max() always gives one row; none means the read failed
                return rows[0][0] or 0
            time.sleep(0.25)
        raise RuntimeError(f"cannot read Airflow's metadata database ({self.engine.url!r}) to follow the run")

    def started_after(self, run_pk: int) -> tuple[str, str] | None:
        """(run_id, state) of the first ``airflow dags test`` run of the DAG created after the run
        with primary key ``run_pk`` (a run the scheduler makes meanwhile is not ours)."""
        rows = self._rows("SELECT run_id, state FROM dag_run WHERE dag_id = :dag_id AND id > :pk "
                          "AND triggering_user_name = 'dag_test' ORDER BY id", pk=run_pk)
        return (rows[0][0], rows[0][1]) if rows else None

    def tasks(self, run_id: str) -> list:
        """(task_id, map_index, try_number, state, duration) of the run's task instances, in the order they ended."""
        return self._rows("SELECT task_id, map_index, try_number, state, duration FROM task_instance "
                          "WHERE dag_id = :dag_id AND run_id = :run_id ORDER BY end_date IS NULL, end_date, "
                          "priority_weight DESC", run_id=run_id)


def task_line(task_id: str, map_index: int, try_number: int, state: str, duration: float | None) -> str:
    name = task_id if map_index in (None, -1) else f"{task_id}[{map_index}]"
    seconds = "" if duration is None else f"{duration:7.1f} s"
    retry = f"  (try {try_number})" if state == "up_for_retry" else ""
    return f"  {name:<14} {state:<16}{seconds}{retry}"


AIRFLOW_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[")  # Airflow's own structured log line
SUMMARY = (re.compile(r"^=+ .+ =+$"), re.compile(r"^=+$"))  # the run summary's first and last line


def task_tail(log: Path, task_id: str | None, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of what a task printed (its last try's part of ``airflow dags test``'s
    output), or of the whole log where there is no such part: less Airflow's own log lines, a traceback
    cut to its exception line, and less the run summary (the failure callback prints it; it comes once, after)."""
    text = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(text) if task_id and f"[DAG TEST] starting task_id={task_id} " in line]
    if starts:
        ends = [i for i, line in enumerate(text[starts[-1]:]) if f"[DAG TEST] end task task_id={task_id} " in line]
        text = text[starts[-1]:starts[-1] + ends[0] if ends else len(text)]
    kept, skipping = [], None
    for line in text:
        if skipping == "traceback" and not line[:1].isspace():
            skipping = None  # the exception's own line ends the traceback: kept
        elif skipping == "summary":
            skipping = None if SUMMARY[1].match(line) else skipping
            continue
        if skipping or AIRFLOW_LINE.match(line):
            continue
        if line.startswith("Traceback (most recent call last):"):
            skipping = "traceback"
        elif SUMMARY[0].match(line):
            skipping = "summary"
        else:
            kept.append(line)
    return kept[-lines:]


def run(project: Path, dag_id: str = RETRAIN_DAG, conf: str | None = None) -> int:
    """Run ``dag_id`` once with ``airflow dags test``; print progress, the summary and the log's path."""
    project = Path(project).resolve()
    environment = airflow_local.env(project)
    airflow_local.init(environment)
    logs = Path(environment["AIRFLOW_HOME"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"dags-test-{dag_id}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.log"
    shown_log = os.path.relpath(log, project) if log.is_relative_to(project) else str(log)
    say = lambda line: print(line, flush=True)  # noqa: E731

    runs = Runs(database_url(environment), dag_id)
    before = runs.newest_id()
    started = time.time()
    command = [sys.executable, "-m", "airflow", "dags", "test", dag_id] + (["-c", conf] if conf else [])
    shown: list[tuple] = []  # (task_id, map_index, try_number, state) printed, in order
    run_id = None

    def show_ended() -> None:
        nonlocal run_id
        if run_id is None:
            found = runs.started_after(before)
            run_id = found[0] if found else None
        for row in runs.tasks(run_id) if run_id else []:
            if row[3] in SHOWN_STATES and tuple(row[:4]) not in shown:
                shown.append(tuple(row[:4]))
                say(task_line(*row))

    with log.open("w") as sink:  # made before its path is shown: whoever reads the line finds the file
        say(f"airflow dags test {dag_id}: the full log goes to {shown_log}")
        # its own session: the terminal's Ctrl-C comes here only, and stop_group passes it on to all of it
        child = subprocess.Popen(command, cwd=project, env=environment, stdout=sink, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    interrupted, stopped = None, False
    try:
        with process.signals_raise():
            while child.poll() is None:
                show_ended()
                time.sleep(POLL_SECONDS)
    except BaseException as error:  # a signal, a broken pipe, a database error: airflow must not outlive us
        interrupted = error
        if child.poll() is None:
            with process.signals_ignored():  # a second Ctrl-C must not cut the stopping short
                if isinstance(error, process.Interrupted):
                    say(f"{error}: stopping airflow dags test")
                process.stop_group(child, lambda: run_id is None or
                                   all(row[3] != "running" for row in runs.tasks(run_id)))
                stopped = True
        if not isinstance(error, process.Interrupted):
            raise
    show_ended()

    code = child.returncode or (130 if stopped else 0)  # a signal after airflow ended changes nothing
    code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + its number
    # the failed tasks, else the one stopped for a retry (Ctrl-C), else the whole log
    failed = [task for task, _, _, state in shown if state == "failed"] or \
        [task for task, _, _, state in shown if state == "up_for_retry"][-1:]
    for task_id in (failed or [None]) if code else []:
        say(f"--- the last lines of {'task ' + task_id if task_id else 'the log'} ---")
        for line in task_tail(log, task_id):
            say(line)
        say("---")
    if dag_id == RETRAIN_DAG and run_id is not None and not interrupted:
        subprocess.run([sys.executable, "-m", "pipeline", "summary", "--newer-than", str(started)], cwd=project,
                       stderr=subprocess.STDOUT)
    say(f"{dag_id} {'succeeded' if code == 0 else f'failed (exit {code})'}; full Airflow log: {shown_log}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.progress", description=__doc__.split("\n\n")[0])
    parser.add_argument("dag_id", nargs="?", default=RETRAIN_DAG)
    parser.add_argument("-c", "--conf", default=None, help="the run's conf as JSON, as for airflow dags test -c")
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the project folder (default: here)")
    args = parser.parse_args(argv)
    return run(args.project, args.dag_id, args.conf)


if __name__ == "__main__":
    raise SystemExit(main())
