"""The registry is closed: a real `mlflow server --app-name basic-auth` on loopback, with the
deployment's own auth settings (docker/mlflow-auth.ini; only its database is a SQLite file
here instead of Postgres), the admin from the environment as docker-compose.yaml gives it.

- The pipeline, with MLFLOW_TRACKING_USERNAME/PASSWORD in its environment (what the compose
  file gives the workers), runs, registers a version and makes it the champion; it promotes
  another and rolls back, through its own CLI and pipeline.registry.
- Without credentials (or with a wrong password) nobody registers a version, moves
  @champion, or rolls back: 401, and the champion stays where it was.
- A logged-in user that nobody granted more (default_permission = READ) reads the champion,
  but cannot register a version or move an alias: 403.
- The server as the deployment runs it on Postgres: logged in as the role docker/postgres-init.sql
  makes (not a superuser), it migrates and uses its two databases (runs and registry; users).

Before the fix the deployment's server had no authentication at all, the basic-auth app could
not even start (Flask-WTF was not installed) and docker/mlflow-auth.ini did not exist.
"""
from __future__ import annotations

import configparser
import os
from pathlib import Path

import pytest

from conftest import make_workspace, run_cli
from servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
AUTH_INI = ROOT / "docker" / "mlflow-auth.ini"
NAME = "anomaly-detector"
ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-the-test"
VIEWER, VIEWER_PASSWORD = "viewer", "viewer-password-for-the-test"
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class AuthMlflowServer(MlflowServer):
    """The suite's `mlflow server`, with the basic-auth app and docker/mlflow-auth.ini."""

    name = "mlflow-auth-server"

    def __init__(self, folder: Path, backend: str | None = None, users_db: str | None = None):
        super().__init__(folder, backend=backend)
        config = configparser.ConfigParser()
        config.read(AUTH_INI)
        # the one difference: where the users are (a SQLite file unless told)
        config["mlflow"]["database_uri"] = users_db or f"sqlite:///{self.folder / 'auth.db'}"
        self.config = self.folder / "mlflow-auth.ini"
        with self.config.open("w") as handle:
            config.write(handle)

    def command(self) -> list[str]:
        return [*super().command(), "--app-name", "basic-auth"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in super().env().items() if k not in CREDENTIALS}
        return {**env, "MLFLOW_AUTH_CONFIG_PATH": str(self.config), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
                "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-the-test"}


def _login(monkeypatch, user: str | None, password: str | None = None) -> None:
    """This process's MLflow client (and the CLI it starts) as ``user``, or anonymous."""
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    if user is not None:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def _as(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AuthMlflowServer(tmp_path_factory.mktemp("mlflow-auth-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ws(server, tmp_path_factory) -> Path:
    """A project whose first model the pipeline, logged in, made the champion (v1)."""
    for name in CREDENTIALS:
        assert name not in os.environ, f"unset {name} to run this test"
    root = make_workspace(tmp_path_factory.mktemp("auth") / "project",
                          {"gates": LOW_GATES, "registry": {"tracking_uri": server.uri}})
    run_cli(root, "run", env=_as(ADMIN, ADMIN_PASSWORD))
    return root


def _client(server):
    from pipeline.registry import Store, connect

    return connect(Store(tracking_uri=server.uri))


def _champion(server, monkeypatch) -> tuple[str | None, str | None]:
    from pipeline.registry import CHAMPION, PREVIOUS, alias_version

    _login(monkeypatch, ADMIN, ADMIN_PASSWORD)
    client = _client(server)
    return alias_version(client, NAME, CHAMPION), alias_version(client, NAME, PREVIOUS)


def _versions(server, monkeypatch) -> list[str]:
    _login(monkeypatch, ADMIN, ADMIN_PASSWORD)
    return sorted(v.version for v in _client(server).search_model_versions(f"name='{NAME}'"))


def test_the_server_refuses_every_request_without_credentials(server):
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(f"{server.uri}/health", timeout=10) as answer:  # the health check needs none
        assert answer.status == 200
    for path in ("/api/2.0/mlflow/registered-models/search", "/api/2.0/mlflow/experiments/search?max_results=1",
                 "/"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.uri}{path}", timeout=10)
        assert refused.value.code == 401, path


def test_the_pipeline_with_credentials_registers_promotes_and_rolls_back(ws, server, monkeypatch):
    assert _champion(server, monkeypatch) == ("1", None)
    _login(monkeypatch, ADMIN, ADMIN_PASSWORD)
    client = _client(server)
    first = client.get_model_version(NAME, "1")
    assert first.tags["gate_status"] == "passed" and first.tags["promoted_by"]
    # a second version of the same model, promoted and rolled back by the CLI, as an operator would
    second = client.create_model_version(NAME, f"models:/{NAME}/1").version
    run_cli(ws, "promote", "--version", str(second), "--force", "--reason", "auth test", env=_as(ADMIN, ADMIN_PASSWORD))
    assert _champion(server, monkeypatch) == (str(second), "1")
    run_cli(ws, "rollback", "--reason", "auth test", env=_as(ADMIN, ADMIN_PASSWORD))
    assert _champion(server, monkeypatch)[0] == "1"


@pytest.mark.parametrize("password", [None, "a-wrong-password"], ids=["anonymous", "wrong-password"])
def test_without_credentials_nobody_registers_or_moves_the_champion(ws, server, monkeypatch, password):
    from mlflow.exceptions import MlflowException

    from pipeline.registry import CHAMPION, promote, rollback

    champion, versions = _champion(server, monkeypatch), _versions(server, monkeypatch)
    _login(monkeypatch, ADMIN if password else None, password)
    client = _client(server)
    source = f"models:/{NAME}/{versions[0]}"  # a real model: an open server would register it
    attempts = {
        "register a version": lambda: client.create_model_version(NAME, source),
        "register a model": lambda: client.create_registered_model("attacker-model"),
        "move @champion": lambda: client.set_registered_model_alias(NAME, CHAMPION, versions[-1]),
        "delete @champion": lambda: client.delete_registered_model_alias(NAME, CHAMPION),
        "promote (the pipeline's code)": lambda: promote(client, NAME, versions[-1], reason="x", forced=True),
        "roll back (the pipeline's code)": lambda: rollback(client, NAME, reason="x"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert "401" in str(refused.value), (what, str(refused.value)[:300])
    # and the CLI an operator (or a task without the secrets) would run
    result = run_cli(ws, "rollback", "--reason", "nobody", check=False,
                     env={**FAIL_FAST, **(_as(ADMIN, password) if password else {})})
    assert result.returncode != 0 and "401" in result.stdout + result.stderr, result.stderr[-2000:]
    assert _champion(server, monkeypatch) == champion and _versions(server, monkeypatch) == versions


def test_a_reader_reads_the_champion_but_cannot_register_or_move_it(ws, server, monkeypatch):
    """docker/mlflow-auth.ini's default_permission: what a user holds that nobody granted more."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from pipeline.registry import CHAMPION, alias_version, promote

    champion, versions = _champion(server, monkeypatch), _versions(server, monkeypatch)
    _login(monkeypatch, ADMIN, ADMIN_PASSWORD)
    users = get_app_client("basic-auth", tracking_uri=server.uri)
    try:
        users.get_user(VIEWER)
    except MlflowException:
        users.create_user(VIEWER, VIEWER_PASSWORD)

    _login(monkeypatch, VIEWER, VIEWER_PASSWORD)
    client = _client(server)
    assert alias_version(client, NAME, CHAMPION) == champion[0]  # READ: may look
    attempts = {
        "register a version": lambda: client.create_model_version(NAME, f"models:/{NAME}/{versions[0]}"),
        "move @champion": lambda: client.set_registered_model_alias(NAME, CHAMPION, versions[-1]),
        "tag a version": lambda: client.set_model_version_tag(NAME, versions[0], "gate_status", "passed"),
        "promote (the pipeline's code)": lambda: promote(client, NAME, versions[-1], reason="x", forced=True),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as refused:
            attempt()
        assert "403" in str(refused.value) or "PERMISSION_DENIED" in str(refused.value), \
            (what, str(refused.value)[:300])
    assert _champion(server, monkeypatch) == champion and _versions(server, monkeypatch) == versions


def test_on_postgres_the_server_runs_as_the_mlflow_role_in_its_own_databases(tmp_path, monkeypatch):
    """docker/postgres-init.sql's role and databases, and docker/mlflow-auth.ini's database_uri
    (its role and database, on this PostgreSQL): MLflow's migrations and the auth app's need no
    more than the role owns."""
    import subprocess
    from urllib.parse import urlsplit, urlunsplit

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from servers import PostgresServer

    postgres = PostgresServer()
    postgres.start()
    server = None
    try:
        roles = subprocess.run(
            ["psql", "-v", "ON_ERROR_STOP=1", "--no-password", "--no-psqlrc", "-h", "127.0.0.1", "-p",
             str(postgres.port), "-U", postgres.USER, "-d", "postgres", "-f", str(ROOT / "docker" / "postgres-init.sql")],
            env={**os.environ, "AIRFLOW_DB_PASSWORD": "airflow-db-password", "MLFLOW_DB_PASSWORD": "mlflow-db-password"},
            capture_output=True, text=True, timeout=60)
        assert roles.returncode == 0, roles.stderr
        config = configparser.ConfigParser()
        config.read(AUTH_INI)
        users_db = urlsplit(config["mlflow"]["database_uri"])
        here = f"{users_db.username}@127.0.0.1:{postgres.port}"
        server = AuthMlflowServer(tmp_path, backend=f"postgresql+psycopg2://{here}/mlflow",
                                  users_db=urlunsplit(users_db._replace(netloc=here)))
        server.start()
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        _login(monkeypatch, None)
        with pytest.raises(MlflowException, match="401"):
            client.create_registered_model("on-postgres")
        _login(monkeypatch, ADMIN, ADMIN_PASSWORD)
        client.create_registered_model("on-postgres")
        assert client.get_registered_model("on-postgres").name == "on-postgres"
        for database, table in (("mlflow", "registered_models"), ("mlflow_auth", "users")):
            (owner,) = postgres.execute(database, f"SELECT tableowner FROM pg_tables WHERE tablename = '{table}'")[0]
            assert owner == "mlflow", (database, table, owner)
    finally:
        if server is not None:
            server.stop()
        postgres.stop()
