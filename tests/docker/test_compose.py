"""docker/: the scaled deployment's files, checked without a Docker engine (none runs here).

- The compose file is valid for a real compose implementation: Debian's docker-compose
  (`make test` installs it), whose `config` parses, validates against the compose schema
  and interpolates the settings without an engine.
- Every long-running service has a health check; the one-shot jobs are waited on for their
  successful completion instead.
- What it runs matches the project: the image is built from docker/Dockerfile with the lock
  file; the Airflow and MLflow commands parse with this venv's own CLIs; the train queue,
  the store endpoints and the buckets agree with each other and with pipeline/deploy.py.
- It is closed by default (issue 19, item 1): every published port listens on BIND_ADDRESS
  (127.0.0.1 unless set), MLflow runs its basic-auth app with docker/mlflow-auth.ini (a user
  nobody granted more may only read), no secret is a command-line argument, each service holds
  only its own secrets (its own Postgres role, its own MinIO user and bucket), compose itself
  refuses to start without any secret, and every pulled image is pinned by digest while the
  project image leaves the test tools out.
- docker/postgres-init.sql against a real PostgreSQL, docker/minio-setup.sh against a
  stand-in for `mc` that records what it is asked.
- docker/.env.example names every setting the compose file reads, and holds no secret.
- `make airflow` (pipeline/airflow_local.py) listens on 127.0.0.1 only.
"""
from __future__ import annotations

import configparser
import json
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

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
AUTH_INI = DOCKER / "mlflow-auth.ini"
PROJECT_PATH = "/opt/anomaly-pipeline"
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                    "airflow-worker", "airflow-gpu-worker"}
WORKERS = {"airflow-worker", "airflow-gpu-worker"}
ONE_SHOTS = {"init", "minio-setup"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|ACCESS_KEY")
# who may hold each secret of docker/.env.example; a new secret must be placed here
SECRET_HOLDERS = {
    "POSTGRES_PASSWORD": {"postgres"},  # the superuser
    "AIRFLOW_DB_PASSWORD": {"postgres"} | AIRFLOW_SERVICES | {"init"},
    "MLFLOW_DB_PASSWORD": {"postgres", "mlflow"},
    "AIRFLOW_FERNET_KEY": AIRFLOW_SERVICES | {"init"},
    "AIRFLOW_JWT_SECRET": AIRFLOW_SERVICES | {"init"},
    "AIRFLOW_SECRET_KEY": AIRFLOW_SERVICES | {"init"},
    "MLFLOW_ADMIN_PASSWORD": {"mlflow"} | WORKERS,
    "MLFLOW_SECRET_KEY": {"mlflow"},
    "MINIO_ROOT_PASSWORD": {"minio", "minio-setup"},
    "MLFLOW_S3_PASSWORD": {"minio-setup", "mlflow"},
    "PIPELINE_S3_PASSWORD": {"minio-setup"} | WORKERS,
}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _compose(*args: str, env_file: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: `make test` installs Debian's (make test-packages)"
    return subprocess.run([binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith(("COMPOSE_", "DOCKER_")) and k != "BIND_ADDRESS"})


def _example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                if line.strip() and not line.startswith("#"))


def _services_with(env_file: Path) -> dict[str, dict]:
    result = _compose("config", env_file=env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return _services_with(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def marked(tmp_path_factory) -> tuple[dict[str, dict], dict[str, str]]:
    """The stack with every secret set to a value of its own, and those values by name."""
    values = {name: f"{name.lower().replace('_', '')}x{len(name)}" for name in _example() if SECRET_NAME.search(name)}
    env_file = tmp_path_factory.mktemp("env") / ".env"
    env_file.write_text("".join(f"{k}={values.get(k, v)}\n" for k, v in _example().items()))
    return _services_with(env_file), values


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _ports(service: dict) -> list[tuple[str | None, str, str]]:
    """(host address, host port, container port) of each published port, whichever form
    `config` writes (docker-compose v1: "127.0.0.1:5000:5000/tcp", or a mapping)."""
    found = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.append((port.get("host_ip"), str(port.get("published")), str(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = ":".join(parts[:-2]) if len(parts) > 2 else None
        found.append((host_ip, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return found


def test_the_compose_file_is_valid_and_starts_the_whole_stack(services):
    assert set(services) == {"postgres", "redis", "minio", "mlflow"} | ONE_SHOTS | AIRFLOW_SERVICES


@pytest.mark.parametrize("secret", sorted(SECRET_HOLDERS))
def test_compose_itself_refuses_to_start_without_any_secret(secret, tmp_path):
    """${VAR:?message} at every use: not only `make up` checks, any compose command does."""
    compose = COMPOSE_FILE.read_text()
    uses = re.findall(r"(?<!\$)\$\{" + secret + r"(:\?|:-|-|\?|\})", compose)
    assert uses and set(uses) == {":?"}, (secret, uses)
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in _example().items() if k != secret))
    result = _compose("config", env_file=env_file)
    assert result.returncode != 0 and secret in result.stderr, result.stderr


def test_every_secret_has_its_holders_named():
    assert {name for name in _example() if SECRET_NAME.search(name)} == set(SECRET_HOLDERS)


def test_each_service_holds_only_its_own_secrets(marked):
    """Separate Postgres roles for Airflow and MLflow, a MinIO user per bucket; the superuser's
    and MinIO's root passwords stay where they are needed."""
    services, values = marked
    for name, service in services.items():
        environment = " ".join(_env(service).values())
        held = {secret for secret, value in values.items() if value in environment}
        allowed = {secret for secret, holders in SECRET_HOLDERS.items() if name in holders}
        assert held <= allowed, (name, sorted(held - allowed))
        assert allowed <= held, (name, sorted(allowed - held))  # the table says what each needs


def test_no_secret_is_on_a_command_line(marked):
    """What `ps` and `docker inspect` show of a process: its command, entrypoint and checks."""
    services, values = marked
    for name, service in services.items():
        shown = json.dumps([service.get(key) for key in ("command", "entrypoint", "healthcheck", "image", "labels")])
        leaked = sorted(secret for secret, value in values.items() if value in shown)
        assert not leaked, (name, leaked)


def test_published_ports_listen_on_loopback_unless_bind_address_says_otherwise(services, tmp_path):
    published = {name: _ports(service) for name, service in services.items() if service.get("ports")}
    assert set(published) == {"airflow-apiserver", "mlflow", "minio"}
    for name, ports in published.items():
        for host_ip, host_port, _ in ports:
            assert host_ip == "127.0.0.1" and host_port, (name, ports)  # never all interfaces, never bare
    # one variable opens them all
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text().replace("BIND_ADDRESS=127.0.0.1", "BIND_ADDRESS=192.0.2.7"))
    opened = _services_with(env_file)
    assert {host for name in published for host, _, _ in _ports(opened[name])} == {"192.0.2.7"}
    # and nothing else is published (not redis, not postgres): the compose text itself
    for entry in re.findall(r"^\s+- \"(.*?:\d+:\d+)\"$", COMPOSE_FILE.read_text(), re.M):
        assert entry.startswith("${BIND_ADDRESS:-127.0.0.1}:"), entry


def test_mlflow_runs_its_auth_app_and_the_workers_log_in(services):
    from mlflow.cli import cli as mlflow_cli

    mlflow = services["mlflow"]
    command = mlflow["command"]
    context = mlflow_cli.commands["server"].make_context("server", list(command[2:]))
    assert context.params["app_name"] == "basic-auth"
    env = _env(mlflow)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{PROJECT_PATH}/docker/mlflow-auth.ini" and AUTH_INI.is_file()
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] and env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]  # the auth app refuses to start without one
    config = configparser.ConfigParser()
    config.read(AUTH_INI)
    auth = config["mlflow"]
    # a logged-in user nobody granted more may look, not register or move an alias
    assert auth["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert not ({"admin_password"} & set(auth)), "the admin's password comes from the environment"
    users_db = urlsplit(auth["database_uri"])
    assert (users_db.username, users_db.password, users_db.hostname, users_db.path) == \
        ("mlflow", None, "postgres", "/mlflow_auth")  # the mlflow role's own database; PGPASSWORD
    for name in WORKERS:  # the pipeline's client reads these (MlflowClient, mlflow.pyfunc)
        worker = _env(services[name])
        assert worker["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"]
        assert worker["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_every_pulled_image_is_pinned_by_digest_and_the_built_one_has_no_latest_tag(services):
    for name, service in services.items():
        if "build" in service:
            assert not service["image"].endswith(":latest") and ":" in service["image"], (name, service["image"])
        else:
            assert DIGEST.search(service["image"]) and ":latest" not in service["image"], (name, service["image"])
    bases = re.findall(r"^FROM\s+(\S+)", (DOCKER / "Dockerfile").read_text(), re.M)
    assert bases and all(DIGEST.search(base) for base in bases), bases


def _closure(requirements: Path) -> set[str]:
    """The installed distributions a requirements file pulls in, with their extras' and
    markers' own (this venv has the lock file's set installed)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def lines(path: Path):
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                yield from lines(path.parent / line[3:].strip())
            elif line:
                yield Requirement(line)

    seen: set[str] = set()
    todo = [(req, tuple(req.extras)) for req in lines(requirements)]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        seen.add(name)
        for dep in metadata.requires(req.name) or []:
            dep = Requirement(dep)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in environments):
                todo.append((dep, tuple(dep.extras)))
    return {name for name in seen if "[" not in name}


def test_the_project_image_installs_no_test_tool():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "pip install -r requirements-runtime.txt -c requirements.lock" in dockerfile
    assert "requirements.txt" not in re.findall(r"^(?:COPY|RUN) .*", dockerfile, re.M).__str__()
    runtime = _closure(ROOT / "requirements-runtime.txt")
    assert not runtime & {"pytest", "pytest-timeout", "moto", "playwright"}, runtime & {"pytest", "moto"}
    assert {"mlflow", "flask-wtf", "apache-airflow", "psycopg2-binary"} <= runtime  # flask-wtf: basic-auth
    assert _closure(ROOT / "requirements.txt") >= runtime | {"pytest", "moto", "playwright"}  # what `make venv` has
    locked = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "requirements.lock").read_text().split()}
    assert {"flask-wtf", "wtforms"} <= locked


def test_every_long_running_service_has_a_health_check_and_dependents_wait_for_it(services):
    one_shots = {name for name, service in services.items() if service.get("restart") == "no"}
    assert one_shots == ONE_SHOTS
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
    for name in ("init", "mlflow"):
        assert "minio-setup" in services[name]["depends_on"], name


def test_the_project_services_run_the_image_built_from_the_lock_file(services):
    project = {name for name, service in services.items() if "build" in service}
    assert project == AIRFLOW_SERVICES | {"init", "mlflow"}
    for name in project:
        build = services[name]["build"]
        assert Path(build["context"]) == ROOT and build["dockerfile"] == "docker/Dockerfile", name
        assert services[name]["image"] == "anomaly-pipeline:local"
    for name in AIRFLOW_SERVICES | {"init"}:  # every Airflow role works on the same mounted checkout
        mounts = [v.split(":")[:2] if isinstance(v, str) else [v["source"], v["target"]]
                  for v in services[name]["volumes"]]
        assert [str(ROOT), PROJECT_PATH] in mounts, (name, mounts)
        assert _env(services[name])["ANOMALY_PIPELINE_PROJECT"] == PROJECT_PATH
        assert _env(services[name])["AIRFLOW__CORE__DAGS_FOLDER"] == f"{PROJECT_PATH}/dags"

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-", dockerfile, re.M)  # the Makefile's Python
    assert f"WORKDIR {PROJECT_PATH}" in dockerfile and f"ANOMALY_PIPELINE_PROJECT={PROJECT_PATH}" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    assert re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    # no data or secret in the image
    assert {".venv", "data", "runs", "mlflow.db", "docker/.env", ".dvc/cache", ".dvc/config.local"} <= ignored
    for script in ("init.sh", "minio-setup.sh"):
        assert subprocess.run(["bash", "-n", str(DOCKER / script)]).returncode == 0, script


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
    backend = urlsplit(context.params["backend_store_uri"])
    # the mlflow role, its password from PGPASSWORD (libpq), not from the command line
    assert (backend.scheme, backend.username, backend.password, backend.hostname, backend.port, backend.path) == \
        ("postgresql+psycopg2", "mlflow", None, "postgres", 5432, "/mlflow")
    assert _env(services["mlflow"])["PGPASSWORD"]
    # the init job's steps: the DVC remote in the bucket minio-setup makes, this repository's scripts
    init = (DOCKER / "init.sh").read_text()
    assert services["init"]["command"] == ["bash", "docker/init.sh"]
    assert services["minio-setup"]["entrypoint"] == ["/bin/sh", "/minio-setup.sh"]
    assert any(str(v).startswith(f"{DOCKER / 'minio-setup.sh'}:/minio-setup.sh") for v in services["minio-setup"]["volumes"])
    # the database and the pool train runs in, by the code that sets up `make run`'s Airflow
    from pipeline.airflow_local import GPU_POOL

    assert "python -m pipeline airflow " in init and GPU_POOL == "gpu"
    assert _env(services["init"])["ANOMALY_PIPELINE_GPU_SLOTS"] == "1"
    assert _env(services["init"])["DVC_BUCKET"] == "dvc" == _env(services["minio-setup"])["DVC_BUCKET"]
    assert _env(services["minio-setup"])["MLFLOW_BUCKET"] == "mlflow"


def test_the_settings_agree_with_each_other_and_with_the_pipeline(services):
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor  # installed with the project
    from pipeline.deploy import train_placement

    import asyncpg  # noqa: F401  (Airflow 3's async connection to Postgres)
    import psycopg2  # noqa: F401

    assert CeleryExecutor.__name__ == "CeleryExecutor"
    workers = {name: services[name]["command"] for name in WORKERS}
    queues = {name: command[command.index("--queues") + 1] for name, command in workers.items()}
    minio_ports = [target for _, _, target in _ports(services["minio"])]
    for name in AIRFLOW_SERVICES:
        env = _env(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        placement = train_placement(env)  # the DAG file reads the same variables
        assert placement.on == "queue" and placement.queue == queues["airflow-gpu-worker"] == "gpu"
        tracking = urlsplit(env["MLFLOW_TRACKING_URI"])
        assert (tracking.hostname, tracking.port) == ("mlflow", 5000)
        s3 = urlsplit(env["AWS_ENDPOINT_URL_S3"])
        assert s3.hostname == "minio" and str(s3.port) in minio_ports, (s3, minio_ports)
        # the image has no passwd entry for PIPELINE_UID: getpass.getuser() must find these
        assert env["USER"] and env["LOGNAME"] and env["HOME"] == "/opt/airflow"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-apiserver:8080/")
        # the Postgres driver named, and installed (SQLAlchemy 2.1's default, psycopg 3, is not);
        # the airflow role (docker/postgres-init.sql), not the superuser
        for url in (env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__RESULT_BACKEND"]):
            assert "postgresql+psycopg2://airflow:" in url and "@postgres:5432/airflow" in url, url
    assert queues["airflow-worker"] == "default"  # Airflow's default queue: every task but train
    (gpus,) = services["airflow-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert "deploy" not in services["airflow-worker"]
    # S3: MLflow's server and the workers each use the MinIO user minio-setup gives its bucket
    setup, minio = _env(services["minio-setup"]), _env(services["minio"])
    mlflow = _env(services["mlflow"])
    assert (mlflow["AWS_ACCESS_KEY_ID"], mlflow["AWS_SECRET_ACCESS_KEY"]) == \
        (setup["MLFLOW_S3_USER"], setup["MLFLOW_S3_PASSWORD"])
    assert mlflow["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000" == setup["MINIO_ENDPOINT"]
    for name in WORKERS:
        worker = _env(services[name])
        assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) == \
            (setup["PIPELINE_S3_USER"], setup["PIPELINE_S3_PASSWORD"])
        assert worker["AWS_ACCESS_KEY_ID"] != minio["MINIO_ROOT_USER"]
    assert (setup["MINIO_ROOT_USER"], setup["MINIO_ROOT_PASSWORD"]) == \
        (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    # MLflow refuses a Host header it was not told (403): the workers' must be among them
    command = services["mlflow"]["command"]
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    host = urlsplit(_env(services["airflow-worker"])["MLFLOW_TRACKING_URI"]).netloc
    assert any(fnmatch(host, pattern) for pattern in allowed), (host, allowed)
    assert mlflow["USER"] == "pipeline"
    # one key signs the api-server's log requests to the workers: the same everywhere
    assert len({_env(services[name])["AIRFLOW__API__SECRET_KEY"] for name in AIRFLOW_SERVICES}) == 1


def test_the_env_example_names_every_setting_and_holds_no_secret():
    compose = COMPOSE_FILE.read_text()
    read = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", compose))  # $${X}: the container's own
    example = _example()
    assert set(example) == read
    secrets = {k: v for k, v in example.items() if SECRET_NAME.search(k)}
    assert secrets and all(v.startswith("change-me") for v in secrets.values()), secrets
    assert example["BIND_ADDRESS"] == "127.0.0.1"
    assert "/docker/.env" in (ROOT / ".gitignore").read_text().split()


def test_postgres_init_gives_airflow_and_mlflow_their_own_roles_and_databases():
    """docker/postgres-init.sql as the postgres image runs it (psql -f, as the superuser), on a
    real PostgreSQL: two login roles that are not superusers, each owning its databases and
    unable to connect to the other's, their passwords from the environment."""
    import base64
    import hashlib
    import hmac

    from servers import PostgresServer

    server = PostgresServer()
    server.start()
    try:
        command = ["psql", "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc", "-h", "127.0.0.1",
                   "-p", str(server.port), "-U", server.USER, "-d", "postgres", "-f", str(DOCKER / "postgres-init.sql")]
        clean = {k: v for k, v in os.environ.items() if not k.endswith("_DB_PASSWORD")}
        missing = subprocess.run(command, env={**clean, "AIRFLOW_DB_PASSWORD": "airflow-pw"}, capture_output=True,
                                 text=True, timeout=60)
        assert missing.returncode != 0 and "MLFLOW_DB_PASSWORD" in missing.stderr, missing.stderr
        passwords = {"airflow": "airflow-db-password", "mlflow": "mlflow-db-password"}
        made = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env={**clean, "AIRFLOW_DB_PASSWORD": passwords["airflow"],
                                   "MLFLOW_DB_PASSWORD": passwords["mlflow"]})
        assert made.returncode == 0, made.stderr
        roles = server.execute("postgres", "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin, "
                                           "rolpassword FROM pg_authid WHERE rolname IN ('airflow', 'mlflow')")
        assert {row[0] for row in roles} == {"airflow", "mlflow"}
        for name, superuser, createdb, createrole, login, verifier in roles:
            assert (superuser, createdb, createrole, login) == (False, False, False, True), name
            # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>: the environment's password
            iterations, salt, stored = re.match(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):", verifier).groups()
            salted = hashlib.pbkdf2_hmac("sha256", passwords[name].encode(), base64.b64decode(salt), int(iterations))
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            assert base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored, name
        owners = dict(server.execute("postgres", "SELECT datname, pg_get_userbyid(datdba) FROM pg_database"))
        assert {db: owners.get(db) for db in ("airflow", "mlflow", "mlflow_auth")} == \
            {"airflow": "airflow", "mlflow": "mlflow", "mlflow_auth": "mlflow"}
        may = dict(((role, db), ok) for role, db, ok in server.execute(
            "postgres", "SELECT r, d, has_database_privilege(r, d, 'CONNECT') FROM "
                        "unnest(ARRAY['airflow', 'mlflow']) r, unnest(ARRAY['airflow', 'mlflow', 'mlflow_auth', "
                        "'postgres']) d"))
        assert may == {("airflow", "airflow"): True, ("airflow", "mlflow"): False, ("airflow", "mlflow_auth"): False,
                       ("airflow", "postgres"): False, ("mlflow", "airflow"): False, ("mlflow", "mlflow"): True,
                       ("mlflow", "mlflow_auth"): True, ("mlflow", "postgres"): False}
        # each may make its tables in its own database (PostgreSQL 15+ gives public to the owner only)
        import psycopg2

        for role, database in (("airflow", "airflow"), ("mlflow", "mlflow"), ("mlflow", "mlflow_auth")):
            connection = psycopg2.connect(host="127.0.0.1", port=server.port, user=role, dbname=database)
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("CREATE TABLE made_by_owner (x int)")
            connection.close()
    finally:
        server.stop()


FAKE_MC = """#!{python}
import json, os, sys
args = sys.argv[1:]
record = {{"argv": args, "mc_host": os.environ.get("MC_HOST_local")}}
if args[:3] == ["admin", "user", "add"] and len(args) == 4:
    record["stdin"] = sys.stdin.read()
if args[:3] == ["admin", "policy", "create"]:
    record["policy"] = json.load(open(args[5]))
with open(os.environ["FAKE_MC_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
"""


def test_minio_setup_gives_each_role_its_bucket_and_passes_no_secret_as_an_argument(tmp_path):
    """docker/minio-setup.sh against a stand-in for `mc` that records its arguments, its
    standard input and its alias: the script's logic and what it hands each command. (Not a
    real MinIO: none runs here; the mc syntax is mc's own, cmd/admin-user-add.go reads a
    user's keys from standard input when they are not arguments.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(FAKE_MC.format(python=sys.executable))
    (bin_dir / "mc").chmod(0o755)
    log = tmp_path / "mc.log"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_MC_LOG": str(log),
           "MC_CONFIG_DIR": str(tmp_path / "mc-config"),
           "MINIO_ENDPOINT": "http://minio:9000", "MINIO_ROOT_USER": "rootuser", "MINIO_ROOT_PASSWORD": "rootsecret123",
           "MLFLOW_BUCKET": "mlflow", "DVC_BUCKET": "dvc", "MLFLOW_S3_USER": "mlflow",
           "MLFLOW_S3_PASSWORD": "mlflowsecret123", "PIPELINE_S3_USER": "pipeline",
           "PIPELINE_S3_PASSWORD": "pipelinesecret123"}
    result = subprocess.run(["sh", str(DOCKER / "minio-setup.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    secrets = ("rootsecret123", "mlflowsecret123", "pipelinesecret123")
    for call in calls:
        assert not any(secret in " ".join(call["argv"]) for secret in secrets), call["argv"]
        assert call["mc_host"] == "http://rootuser:rootsecret123@minio:9000"  # the root keys, through the environment
    argvs = [call["argv"] for call in calls]
    assert ["mb", "--ignore-existing", "local/mlflow"] in argvs and ["mb", "--ignore-existing", "local/dvc"] in argvs
    users = {call["stdin"].split("\n")[0]: call["stdin"].split("\n")[1] for call in calls if "stdin" in call}
    assert users == {"mlflow": "mlflowsecret123", "pipeline": "pipelinesecret123"}
    attached = {argv[-1]: argv[4] for argv in argvs if argv[:3] == ["admin", "policy", "attach"]}
    assert attached == {"mlflow": "bucket-mlflow", "pipeline": "bucket-dvc"}
    policies = {call["argv"][4]: call["policy"] for call in calls if "policy" in call}
    for policy, bucket in (("bucket-mlflow", "mlflow"), ("bucket-dvc", "dvc")):
        resources = {r for statement in policies[policy]["Statement"] for r in statement["Resource"]}
        actions = {a for statement in policies[policy]["Statement"] for a in statement["Action"]}
        assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, policy
        assert all(statement["Effect"] == "Allow" for statement in policies[policy]["Statement"])
        assert actions <= {"s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads", "s3:GetObject",
                           "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}
    # a user exists only once its policy does; an unset secret stops the script before any call
    assert argvs.index(["admin", "user", "add", "local"]) > argvs.index(next(a for a in argvs if a[:3] == ["admin", "policy", "create"]))
    log.unlink()
    unset = subprocess.run(["sh", str(DOCKER / "minio-setup.sh")], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in env.items() if k != "PIPELINE_S3_PASSWORD"})
    assert unset.returncode != 0 and "PIPELINE_S3_PASSWORD" in unset.stderr and not log.exists()


def test_make_airflow_listens_on_loopback_only(tmp_path):
    """`make airflow` runs `python -m pipeline airflow standalone`, whose api-server takes its
    address from [api] host: Airflow's default is 0.0.0.0, pipeline/airflow_local.py's 127.0.0.1;
    an AIRFLOW__API__HOST in the environment still wins."""
    from pipeline import airflow_local

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^airflow: .*\n\t\$\(BIN\)/python -m pipeline airflow standalone$", makefile, re.M)
    probe = ["-c", "from airflow.configuration import conf; print(conf.get('api', 'host'))"]
    outside = {k: v for k, v in os.environ.items() if k != "AIRFLOW__API__HOST"}
    for given, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        os.environ.pop("AIRFLOW__API__HOST", None)
        if given:
            os.environ["AIRFLOW__API__HOST"] = given
        try:
            env = airflow_local.env(ROOT, tmp_path / "airflow-home")
        finally:
            os.environ.clear()
            os.environ.update(outside)
        answer = subprocess.run([sys.executable, *probe], env=env, capture_output=True, text=True, timeout=120)
        assert answer.stdout.strip().splitlines()[-1] == expected, answer.stderr[-2000:]
