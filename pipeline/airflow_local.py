"""A project-local Airflow: ``python -m pipeline airflow <airflow args>``.

Sets AIRFLOW_HOME to ``<project>/.airflow`` (SQLite metadata database, logs, the
generated admin password), points Airflow at the project's dags/, and on first use
migrates the database and creates the ``gpu`` pool the train task runs in. The api-server
(UI, REST API) listens on 127.0.0.1 only: SimpleAuthManager is for one machine. Settings
already in the environment win (AIRFLOW__API__HOST=0.0.0.0 opens it), so a real deployment
configures Airflow as usual.
The Makefile (``make run`` through pipeline.progress, ``make airflow``) and the tests use this one set-up.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GPU_POOL = "gpu"
ADMIN_USER = "admin"
API_HOST = "127.0.0.1"


def env(project: Path, home: Path | None = None) -> dict[str, str]:
    project = Path(project).resolve()
    home = Path(home or os.environ.get("AIRFLOW_HOME") or project / ".airflow").resolve()
    defaults = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(project / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
        "AIRFLOW__API__HOST": API_HOST,  # Airflow's own default is 0.0.0.0: every interface
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "ANOMALY_PIPELINE_PROJECT": str(project),
        "GIT_PYTHON_REFRESH": "quiet",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        # as pipeline/__main__.py sets it, for a caller that is not ``python -m pipeline`` (pipeline.progress)
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    merged = {**os.environ, **{k: v for k, v in defaults.items() if k not in os.environ}}
    merged["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return merged


def init(environment: dict[str, str]) -> None:
    """Migrate the metadata database and create the gpu pool, once per AIRFLOW_HOME."""
    home = Path(environment["AIRFLOW_HOME"])
    stamp = home / ".anomaly-pipeline-initialised"
    if stamp.is_file():
        return
    home.mkdir(parents=True, exist_ok=True)
    airflow = [sys.executable, "-m", "airflow"]
    for command in (["db", "migrate"],
                    ["pools", "set", GPU_POOL, os.environ.get("ANOMALY_PIPELINE_GPU_SLOTS", "1"),
                     "GPUs for training: one train task per slot"]):
        result = subprocess.run([*airflow, *command], env=environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(command)} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    stamp.write_text("db migrated, gpu pool created\n")


def password_file(environment: dict[str, str]) -> Path:
    return Path(environment["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"


def main(project: Path, args: list[str]) -> int:
    environment = env(project)
    init(environment)
    if args[:1] == ["standalone"]:
        host, port = environment["AIRFLOW__API__HOST"], environment.get("AIRFLOW__API__PORT", "8080")
        print(f"airflow: AIRFLOW_HOME={environment['AIRFLOW_HOME']}; UI at http://{host}:{port} once started; "
              f"log in as '{ADMIN_USER}' with the password in {password_file(environment)}")
    os.execve(sys.executable, [sys.executable, "-m", "airflow", *args], environment)
    return 0  # not reached
