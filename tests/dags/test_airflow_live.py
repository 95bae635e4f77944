"""A real Airflow on loopback: api-server, scheduler (LocalExecutor) and dag-processor,
started here on free ports with a throw-away AIRFLOW_HOME and SQLite, and stopped after.

Through the REST API v2 a run is triggered with a changed parameter and must succeed
with that value in its MLflow run; bad parameters are refused with the key's name.
Then Debian's chromium, driven by Playwright, logs into the UI, changes a parameter in
the trigger form and triggers; the run must exist with that value.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import make_workspace

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
DAG_ID = "retrain_anomaly_detector"
LOW_GATES = {"gates": {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, every: float = 1.0):
    """Poll until condition() returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Airflow:
    url: str
    ws: Path
    home: Path
    logs: Path
    password: str
    token: str = ""
    processes: tuple = ()

    def check_alive(self) -> None:
        """A component that died (a worker that cannot start) fails the wait at once, with its log."""
        dead = [p for p in self.processes if p.poll() is not None]
        assert not dead, f"an Airflow component exited ({[p.args[3:] for p in dead]}):\n{self.tail()}"

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, {}

    def runs(self) -> list[dict]:
        return self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=-start_date&limit=100")[1]["dag_runs"]

    def tail(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


COMPONENTS = {name: [sys.executable, "-m", "airflow", name] for name in ("api-server", "scheduler", "dag-processor")}


@contextmanager
def running_airflow(root: Path, ws: Path, extra_env: dict[str, str] | None = None,
                    components: dict[str, list[str]] = COMPONENTS) -> Iterator[Airflow]:
    """Airflow's components for the project ``ws`` on a free port, AIRFLOW_HOME in ``root``;
    ``extra_env`` on top (another executor, database); logged in once the DAG is registered."""
    from pipeline import airflow_local

    port = free_port()
    saved_home = os.environ.pop("AIRFLOW_HOME", None)
    try:
        env = airflow_local.env(ws, root / "airflow-home")
    finally:
        if saved_home is not None:
            os.environ["AIRFLOW_HOME"] = saved_home
    url = f"http://127.0.0.1:{port}"
    env.update({
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        # No scheduled runs: within 2.4 h after 02:00 UTC the unpause in trigger_and_wait would
        # also start last night's run, whose model could take the champion first and make the
        # test's own run skip its promote (CronTriggerTimetable's run_immediately=False
        # still runs a cron time less than a tenth of the interval ago). Tests trigger their runs.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        **(extra_env or {}),
    })
    for inherited in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_ARTIFACT_ROOT", "ANOMALY_PIPELINE_RUNS"):
        env.pop(inherited, None)
    airflow_local.init(env)
    logs = root / "logs"
    logs.mkdir()
    processes = []
    for name, command in components.items():
        with (logs / f"{name}.log").open("w") as log:
            # each component its own log-serving port (two Celery workers on one host would clash)
            own = {**env, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())} if "worker" in name else env
            processes.append(subprocess.Popen(command, cwd=ws, env=own, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    server = Airflow(url=url, ws=ws, home=root / "airflow-home", logs=logs, password="", processes=tuple(processes))
    try:
        def healthy():
            status, body = server.request("GET", "/api/v2/monitor/health")
            return status == 200 and all(body.get(part, {}).get("status") == "healthy"
                                         for part in ("metadatabase", "scheduler", "dag_processor"))

        wait_for(healthy, 180, "api-server, scheduler and dag-processor to report healthy")
        server.password = json.loads(airflow_local.password_file(env).read_text())[airflow_local.ADMIN_USER]
        status, body = server.request("POST", "/auth/token", {"username": "admin", "password": server.password})
        assert status in (200, 201), body
        server.token = body["access_token"]
        wait_for(lambda: server.request("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200, 180,
                 "the dag-processor to register the DAG")
        yield server
    except BaseException:
        print(server.tail())
        raise
    finally:
        for process in processes:  # the whole group: a leader that exited may have left children
            _signal_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout=30)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:  # nothing of the group is left
        pass


def trigger_and_wait(airflow: Airflow, conf: dict, timeout: float = 600) -> tuple[str, str]:
    """Unpause, trigger with ``conf`` through the REST API, wait; (run id, final state)."""
    status, body = airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    assert status == 200 and body["is_paused"] is False
    status, run = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, run
    run_id = run["dag_run_id"]

    def finished():
        airflow.check_alive()
        state = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")[1].get("state")
        return state if state in ("success", "failed") else None

    try:
        return run_id, wait_for(finished, timeout, f"run {run_id} to finish", every=3)
    except AssertionError:
        print(airflow.tail())
        raise


def task_instances(airflow: Airflow, run_id: str) -> dict[str, dict]:
    status, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    assert status == 200, body
    return {ti["task_id"]: ti for ti in body["task_instances"]}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    with running_airflow(root, make_workspace(root / "project", LOW_GATES)) as server:
        yield server


def mlflow_run_of(ws: Path, airflow_run_id: str):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("anomaly-detector")
    [run] = client.search_runs([experiment.experiment_id], f"tags.airflow_run_id = '{airflow_run_id}'")
    return run


def test_rest_api_trigger_with_a_changed_parameter_runs_to_success(airflow):
    run_id, state = trigger_and_wait(airflow, {"epochs": 4})
    assert state == "success", airflow.tail()
    states = {task: ti["state"] for task, ti in task_instances(airflow, run_id).items()}
    assert set(states.values()) == {"success"} and len(states) == 8, states
    run = mlflow_run_of(airflow.ws, run_id)
    assert run.data.params["train.epochs"] == "4"
    assert run.data.tags["trigger"] == "airflow-manual"


@pytest.mark.parametrize("conf, key", [
    ({"epochs": 0}, "epochs"),
    ({"model_type": "random_forest"}, "model_type"),
    ({"target_fpr": 1.5}, "target_fpr"),
])
def test_rest_api_refuses_bad_parameters_and_creates_no_run(airflow, conf, key):
    before = len(airflow.runs())
    status, body = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 400 and key in body["detail"], body
    assert len(airflow.runs()) == before


def sign_in(page, airflow) -> None:
    """Log a Playwright page in to the live Airflow UI as its admin."""
    page.goto(f"{airflow.url}/")
    page.locator("input[name=username]").fill("admin")
    page.locator("input[name=password]").fill(airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=30_000)


def test_a_browser_changes_a_parameter_in_the_trigger_form_and_triggers(airflow, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is missing: `make test` installs it (Debian package chromium)"
    shots = Path(os.environ.get("ANOMALY_PIPELINE_SCREENSHOTS") or tmp_path)
    before = {r["dag_run_id"] for r in airflow.runs()}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            sign_in(page, airflow)
            page.goto(f"{airflow.url}/dags/{DAG_ID}")
            page.get_by_role("button", name="Trigger").first.click()
            dialog = page.get_by_role("dialog")
            dialog.wait_for()
            epochs = dialog.locator("input[name=element_epochs]")
            epochs.fill("2")
            dialog.locator("input[name=element_learning_rate]").fill("0.005")
            dialog.screenshot(path=str(shots / "airflow_trigger_form.png"))
            dialog.get_by_role("button", name="Trigger", exact=True).click()
            dialog.wait_for(state="hidden", timeout=30_000)
            created = wait_for(lambda: [r for r in airflow.runs() if r["dag_run_id"] not in before], 60,
                               "the run triggered from the form")
            # the picture in README.md and docs/operations.md: the graph of the finished run (or of this one)
            finished = [r for r in airflow.runs() if r["state"] == "success"]
            page.set_viewport_size({"width": 1500, "height": 560})
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{(finished or created)[0]['dag_run_id']}")
            page.get_by_role("button", name="Collapse Details Panel").click()
            page.get_by_role("button", name="Show Graph (Press g)").click()
            wait_for(lambda: page.locator(".react-flow__node").count() >= 8, 30, "the graph's eight task nodes")
            page.screenshot(path=str(shots / "airflow_dag_graph.png"))
        finally:
            browser.close()
    [run] = created
    assert run["conf"]["epochs"] == 2 and run["conf"]["learning_rate"] == 0.005
    assert run["conf"]["model_type"] == "deep_sad"  # untouched fields keep params.yaml's values (the workspace's)
    assert (shots / "airflow_trigger_form.png").stat().st_size > 10_000
