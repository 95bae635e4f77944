"""Real servers the tests start on loopback and stop after: `mlflow server`, an
S3-compatible server (moto's server mode, from PyPI; MinIO plays this part in
docker/docker-compose.yaml), PostgreSQL and Redis (Debian's, which `make test` installs).

Each runs in its own session, so stopping it reaches its workers too.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
# moto accepts any credentials; these stand in for a deployment's secrets
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _Process:
    """A server process in ``folder`` (its log is ``<name>.log`` there), ready when ``ready_url`` answers 200."""

    name = "server"

    def __init__(self, folder: Path):
        self.folder, self.port, self.process = Path(folder), free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready_url(self) -> str:
        return self.uri

    def start(self, timeout: float = 240) -> None:
        log = self.folder / f"{self.name}.log"
        with log.open("a") as handle:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(self.command(), stdout=handle, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.process.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.ready_url(), timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()  # a fixture that fails here never reaches its own stop
        raise AssertionError(f"{self.name} not ready after {timeout} s: {log.read_text()[-3000:]}")

    def crash(self) -> None:
        """The whole server at once, as an OOM kill or a lost host would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.2)  # a worker still holds the port
            except OSError:
                return
        raise AssertionError(f"the killed {self.name} still answers")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class S3Server(_Process):
    """moto's S3 in server mode: the real S3 wire protocol (boto3, s3fs, DVC, MLflow talk to
    it as to AWS or MinIO), objects held in the server's memory."""

    name = "s3"

    def command(self) -> list[str]:
        return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"{self.uri}/moto-api/"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.uri, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


class MlflowServer(_Process):
    """`mlflow server` with a SQLite backend (or ``backend``) and proxied artifacts: in
    ``folder``/artifacts, or at ``artifacts`` (an s3:// URI, with ``s3`` the server that holds it)."""

    name = "mlflow-server"

    def __init__(self, folder: Path, artifacts: str | None = None, s3: S3Server | None = None,
                 backend: str | None = None):
        super().__init__(folder)
        self.artifacts = artifacts or str(self.folder / "artifacts")
        self.s3 = s3
        self.backend = backend or f"sqlite:///{self.folder / 'server.db'}"

    def command(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
                "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", "1"]

    def env(self) -> dict[str, str]:
        if self.s3 is None:
            return dict(os.environ)
        return {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.s3.uri}

    def ready_url(self) -> str:
        return f"{self.uri}/health"


class PostgresServer:
    """A PostgreSQL cluster of its own (initdb in a fresh folder, trust authentication on
    loopback only), its databases made by ``create``. The server refuses to run as root, so
    under root (CI) it runs as Debian's ``postgres`` user, in a folder that user owns."""

    USER = "pipeline"

    def __init__(self):
        import glob
        import shutil
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        assert found, "PostgreSQL is not installed: `make test` installs Debian's (make test-packages)"
        self.bin = Path(found[-1]).parent
        self.port, self.process = free_port(), None
        self.folder = Path(tempfile.mkdtemp(prefix="pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 120) -> None:
        data, log = self.folder / "data", self.folder / "postgres.log"
        subprocess.run([*self.as_user, str(self.bin / "initdb"), "-D", str(data), "-U", self.USER, "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=timeout)
        self.process = subprocess.Popen(
            [*self.as_user, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-h", "127.0.0.1",
             "-k", str(self.folder), "-c", "fsync=off"],
            stdout=log.open("a") if not self.as_user else subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"postgres exited {self.process.returncode}")
            ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"postgres not ready after {timeout} s")

    def connect(self, database: str = "postgres"):
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.USER, dbname=database)
        connection.autocommit = True
        return connection

    def execute(self, database: str, sql: str) -> list[tuple]:
        connection = self.connect(database)  # not `with connection`: psycopg2 opens a transaction there
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def create(self, *databases: str) -> None:
        for name in databases:
            self.execute("postgres", f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        import shutil

        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # postgres' "fast" shutdown
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisServer:
    """Debian's redis-server on loopback, nothing persisted: the Celery broker."""

    def __init__(self):
        import shutil

        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server is not installed: `make test` installs Debian's (make test-packages)"
        self.port, self.process = free_port(), None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"redis-server not ready after {timeout} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
