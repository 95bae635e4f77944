"""docker/: the scaled deployment's files, checked without a Docker engine (none runs here).

- The compose file is valid for a real compose implementation: Debian's docker-compose
  (`make test` installs it), whose `config` parses, validates against the compose schema
  and interpolates the settings without an engine.
- Every long-running service has a health check; the one-shot init job is waited on for
  its successful completion instead.
- What it runs matches the project: the image is built from docker/Dockerfile with the lock
  file; the Airflow and MLflow commands parse with this venv's own CLIs; the train queue,
  the store endpoints and the buckets agree with each other and with pipeline/deploy.py.
- docker/.env.example names every setting the compose file reads, and holds no secret.
- docker/create_buckets.py (the init job's) against a real S3 server (moto) on loopback.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from servers import S3_CREDENTIALS, S3Server

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROJECT_PATH = "/opt/anomaly-pipeline"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-gpu-worker"}


def _compose(*args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make test` installs Debian's (make test-packages)"
    return subprocess.run([binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))})


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_the_compose_file_is_valid_and_starts_the_whole_stack(services):
    assert set(services) == {"postgres", "redis", "minio", "init", "mlflow"} | AIRFLOW_SERVICES


def test_a_missing_secret_is_refused_with_its_name(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines()
                                if not line.startswith("POSTGRES_PASSWORD=")))
    result = _compose("config", env_file=env_file)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr, result.stderr


def test_every_long_running_service_has_a_health_check_and_dependents_wait_for_it(services):
    one_shots = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shots == {"init"}
    for name, service in services.items():
        if name in one_shots:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service.get("restart") == "always", name
    for name, service in services.items():
        for upstream, how in (service.get("depends_on") or {}).items():
            wanted = "service_completed_successfully" if upstream in one_shots else "service_healthy"
            assert how["condition"] == wanted, (name, upstream, how)
    # nothing of the project starts before the stores and the database are set up
    for name in AIRFLOW_SERVICES | {"mlflow"}:
        assert "init" in services[name]["depends_on"], name


def test_the_project_services_run_the_image_built_from_the_lock_file(services):
    project = {name for name, service in services.items() if "build" in service}
    assert project == AIRFLOW_SERVICES | {"init", "mlflow"}
    for name in project:
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and build["dockerfile"] == "docker/Dockerfile", name
        assert services[name]["image"] == "anomaly-pipeline:latest"
    for name in AIRFLOW_SERVICES | {"init"}:  # every Airflow role works on the same mounted checkout
        mounts = [v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]]
                  for v in services[name]["volumes"]]
        assert [str(ROOT), PROJECT_PATH] in mounts, (name, mounts)
        assert _env(services[name])["ANOMALY_PIPELINE_PROJECT"] == PROJECT_PATH
        assert _env(services[name])["AIRFLOW__CORE__DAGS_FOLDER"] == f"{PROJECT_PATH}/dags"

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-", dockerfile, re.M)  # the Makefile's Python
    assert "pip install -r requirements.txt -c requirements.lock" in dockerfile
    assert f"WORKDIR {PROJECT_PATH}" in dockerfile and f"ANOMALY_PIPELINE_PROJECT={PROJECT_PATH}" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    # no data or secret in the image
    assert {".venv", "data", "runs", "mlflow.db", "docker/.env", ".dvc/cache", ".dvc/config.local"} <= ignored
    assert subprocess.run(["bash", "-n", str(DOCKER / "init.sh")]).returncode == 0


def test_the_commands_parse_with_this_projects_airflow_and_mlflow(services):
    from airflow.cli.cli_parser import get_parser
    from mlflow.cli import cli as mlflow_cli

    parser = get_parser()
    for name in AIRFLOW_SERVICES:
        command = services[name]["command"]
        assert command[0] == "airflow", name
        parsed = parser.parse_args(command[1:])  # SystemExit on an unknown command or option
        assert callable(parsed.func), name
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    context = mlflow_cli.commands["server"].make_context("server", list(command[2:]))
    assert context.params["port"] == 5000 and context.params["artifacts_destination"] == "s3://mlflow/"
    assert context.params["backend_store_uri"].startswith("postgresql+psycopg2://") and \
        context.params["backend_store_uri"].endswith("@postgres:5432/mlflow")
    # the init job's steps: the buckets MLflow and DVC use, this repository's scripts
    init = (DOCKER / "init.sh").read_text()
    assert services["init"]["command"] == ["bash", "docker/init.sh"]
    assert "docker/create_buckets.py" in init and (DOCKER / "create_buckets.py").is_file()
    # the database and the pool train runs in, by the code that sets up `make run`'s Airflow
    from pipeline.airflow_local import GPU_POOL

    assert "python -m pipeline airflow " in init and GPU_POOL == "gpu"
    assert _env(services["init"])["ANOMALY_PIPELINE_GPU_SLOTS"] == "1"
    assert {"MLFLOW_BUCKET": "mlflow", "DVC_BUCKET": "dvc"}.items() <= _env(services["init"]).items()


def test_the_settings_agree_with_each_other_and_with_the_pipeline(services):
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor  # installed with the project
    from pipeline.deploy import train_placement

    import asyncpg  # noqa: F401  (Airflow 3's async connection to Postgres)
    import psycopg2  # noqa: F401

    assert CeleryExecutor.__name__ == "CeleryExecutor"
    workers = {name: services[name]["command"] for name in ("airflow-worker", "airflow-gpu-worker")}
    queues = {name: command[command.index("--queues") + 1] for name, command in workers.items()}
    for name in AIRFLOW_SERVICES:
        env = _env(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        placement = train_placement(env)  # the DAG file reads the same variables
        assert placement.on == "queue" and placement.queue == queues["airflow-gpu-worker"] == "gpu"
        tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert (tracking.hostname, tracking.port) == ("mlflow", 5000)
        s3 = urlsplit(env["AWS_ENDPOINT_URL_S3"])
        published = [str(p.get("target")) if isinstance(p, dict) else str(p).split(":")[-1]
                     for p in services["minio"]["ports"]]
        assert s3.hostname == "minio" and str(s3.port) in published, (s3, published)
        # the image has no passwd entry for PIPELINE_UID: getpass.getuser() must find these
        assert env["USER"] and env["LOGNAME"] and env["HOME"] == "/opt/airflow"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
        # the Postgres driver named, and installed: SQLAlchemy 2.1's default (psycopg 3) is not
        for url in (env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__RESULT_BACKEND"]):
            assert "postgresql+psycopg2://" in url and "@postgres:5432/airflow" in url, url
    assert queues["airflow-worker"] == "default"  # Airflow's default queue: every task but train
    (gpus,) = services["airflow-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert "deploy" not in services["airflow-worker"]
    # the MLflow server and the clients use the same S3 keys MinIO starts with
    minio = _env(services["minio"])
    assert _env(services["mlflow"])["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"] == \
        _env(services["airflow-worker"])["AWS_ACCESS_KEY_ID"]
    assert _env(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # MLflow refuses a Host header it was not told (403): the workers' must be among them
    command = services["mlflow"]["command"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    host = urlsplit(_env(services["airflow-worker"])["MLFLOW_TRACKING_URI"]).netloc
    assert any(fnmatch(host, pattern) for pattern in allowed), (host, allowed)
    assert _env(services["mlflow"])["USER"] == "pipeline"
    # one key signs the api-server's log requests to the workers: the same everywhere
    assert len({_env(services[name])["AIRFLOW__API__SECRET_KEY"] for name in AIRFLOW_SERVICES}) == 1


def test_the_env_example_names_every_setting_and_holds_no_secret():
    compose = COMPOSE_FILE.read_text()
    read = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", compose))  # $${X}: the container's own
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert set(example) == read
    secrets = {k: v for k, v in example.items() if re.search(r"PASSWORD|SECRET|FERNET|ACCESS_KEY", k)}
    assert secrets and all(v.startswith("change-me") for v in secrets.values()), secrets
    assert "/docker/.env" in (ROOT / ".gitignore").read_text().split()


def test_create_buckets_makes_what_is_missing_and_leaves_what_exists(tmp_path):
    s3 = S3Server(tmp_path)
    s3.start()
    try:
        s3.client().create_bucket(Bucket="mlflow")
        env = {**os.environ, **S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3.uri}  # as compose sets it
        command = [sys.executable, str(DOCKER / "create_buckets.py"), "mlflow", "dvc"]
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert "created ['dvc']; ['mlflow'] existed" in first.stdout
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert "created none" in again.stdout
        assert {b["Name"] for b in s3.client().list_buckets()["Buckets"]} == {"mlflow", "dvc"}
        s3.client().put_object(Bucket="dvc", Key="kept", Body=b"x")
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        assert s3.keys("dvc") == ["kept"]
    finally:
        s3.stop()
