"""Shared fixtures: small generated data and scratch project workspaces.

Nothing is downloaded: images come from components.synthetic. A workspace is a
copy of the project's code, dvc.yaml and params.yaml in a temporary git + DVC
repository, with params shrunk so a whole run takes seconds of training.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.scratch import deep_update, make_project
from components.synthetic import BatchSpec, write_batch

PROJECT = Path(__file__).resolve().parents[1]
TINY_SPEC = BatchSpec(n_good=150, n_per_defect=15, size=64)

# params for a run that trains in seconds; everything else is the project's params.yaml
TINY_PARAMS = {
    "preprocess": {"image_size": 32},
    "model": {"type": "deep_sad", "width": 8, "latent_dim": 16},
    "train": {"epochs": 8, "batch_size": 32, "learning_rate": 0.003, "num_threads": 1},
    "validate": {"min_good": 10, "min_anomalies": 5},
    "calibration": {"target_fpr": 0.1},
}


def set_params(root: Path, **sections) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    deep_update(params, sections)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the venv's bin on PATH, less the MLflow and Airflow settings a
    developer's shell may hold (a workspace uses its own stores), plus ``extra``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for inherited in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_ARTIFACT_ROOT",
                      "AIRFLOW_HOME", "ANOMALY_PIPELINE_PROJECT", "ANOMALY_PIPELINE_RUNS"):
        env.pop(inherited, None)
    return {**env, **(extra or {})}


def run_cli(root: Path, *args: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """python -m pipeline in the workspace, as a user would (see clean_env; ``env`` is added)."""
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=root, env=clean_env(env),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout ---\n{result.stdout[-6000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=clean_env(), capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def start(root: Path, command: list[str], log: Path) -> subprocess.Popen:
    """A process in its own session (so a group signal reaches it and its children only)."""
    return subprocess.Popen(command, cwd=root, env=clean_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


# what an Airflow task does, without Airflow: python -c DRIVER <project> <run id> <stage>...
DRIVER = """
import sys
from pipeline import orchestrate
project, run_id, *names = sys.argv[1:]
orchestrate.prepare(project, run_id)
for name in names:
    print(orchestrate.stage(project, run_id, name), flush=True)
"""


def make_workspace(root: Path, params: dict | None = None, with_data: bool = True) -> Path:
    """A self-contained project copy (tests/scratch.py's make_project) with TINY_PARAMS, plus one tiny batch."""
    make_project(root, deep_update(yaml.safe_load(yaml.safe_dump(TINY_PARAMS)), params or {}))
    if with_data:
        write_batch(root / "data" / "landing", "batch-0001", seed=7, spec=TINY_SPEC)
    return root


@pytest.fixture(autouse=True)
def _forget_mlflow_uris():
    """mlflow.set_tracking_uri is process-global and exports MLFLOW_TRACKING_URI to every later
    subprocess: a test that points this process at its store must not point the next test there."""
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(scope="session")
def tiny_landing(tmp_path_factory) -> Path:
    """A small valid batch; read-only by convention (copy it before changing it)."""
    landing = tmp_path_factory.mktemp("landing")
    write_batch(landing, "batch-0001", seed=3, spec=BatchSpec(n_good=40, n_per_defect=5, size=64))
    return landing


@pytest.fixture
def landing_copy(tiny_landing, tmp_path) -> Path:
    target = tmp_path / "landing"
    shutil.copytree(tiny_landing, target)
    return target
