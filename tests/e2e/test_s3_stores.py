"""The scaled deployment's stores, for real on loopback: one S3-compatible server (moto's
server mode; MinIO in docker/docker-compose.yaml) is both the DVC remote and the artifact
store of an `mlflow server` (SQLite backend here, Postgres in compose).

Only configuration changes, as a deployment would make it: the project's git-ignored
``.dvc/config.local`` names the S3 remote (the committed default stays the local folder),
``registry.tracking_uri`` names the server, and S3 credentials come from the environment.

One retraining runs as Airflow's tasks run it (pipeline.orchestrate, in a run workspace),
so its ``dvc push`` goes to S3 and its model is uploaded through the server to S3. Then a
fresh clone of the project, with no access to the project's DVC cache, takes the run's
``dvc.lock`` from MLflow, pulls the data from S3 (identical files), and scores the pulled
images with the champion it loads from the registry, without S3 credentials of its own
(the server proxies the artifacts).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import clean_env, dvc, make_workspace
from pipeline.workspace import key_of
from servers import S3_CREDENTIALS, MlflowServer, S3Server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

BUCKET = "anomaly-pipeline"
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}
ORCHESTRATED_RUN = """
import sys
from pipeline import orchestrate
project, run_id = sys.argv[1:]
orchestrate.prepare(project, run_id)
for name in ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate"):
    orchestrate.stage(project, run_id, name)
print("REGISTER", orchestrate.register(project, run_id), flush=True)
print("PROMOTE", orchestrate.promote(project, run_id), flush=True)
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), artifacts=f"s3://{BUCKET}/mlflow", s3=s3)
    server.start()
    yield server
    server.stop()


def _use_s3_remote(root: Path, s3: S3Server) -> None:
    """What a deployment writes once per checkout: a git-ignored remote that replaces the default."""
    dvc(root, "remote", "add", "--local", "-d", "s3", f"s3://{BUCKET}/dvc")
    dvc(root, "remote", "modify", "--local", "s3", "endpointurl", s3.uri)


def _digests(root: Path, folders: list[str]) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file()}


def test_a_run_pushes_to_s3_and_a_fresh_clone_pulls_the_data_and_scores_with_the_champion(s3, tracking, tmp_path):
    from mlflow import MlflowClient

    project = make_workspace(tmp_path / "project", {"gates": LOW_GATES,
                                                    "train": {"epochs": 2},
                                                    "registry": {"tracking_uri": tracking.uri}})
    _use_s3_remote(project, s3)
    run = subprocess.run([sys.executable, "-c", ORCHESTRATED_RUN, str(project), "scheduled__s3"], cwd=project,
                         env=clean_env(S3_CREDENTIALS), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "dvc push to the remote failed" not in run.stdout + run.stderr
    assert "'promoted': True" in run.stdout, run.stdout[-3000:]

    # the data went to S3 and only there: the committed local remote was not used
    assert s3.keys(BUCKET, "dvc/"), "nothing was pushed to the S3 remote"
    assert not any(p.is_file() for p in (project / "dvc-remote").rglob("*"))
    # the model's files are on S3 and the server kept none on its own disk
    assert any("/artifacts/" in key for key in s3.keys(BUCKET, "mlflow/")), s3.keys(BUCKET, "mlflow/")[:20]
    assert not (tracking.folder / "artifacts").exists() and not (project / "mlartifacts").exists()

    client = MlflowClient(tracking_uri=tracking.uri, registry_uri=tracking.uri)
    champion = client.get_model_version_by_alias("anomaly-detector", "champion")

    # a fresh clone on "another machine": its own empty DVC cache, the same deployment settings,
    # the run's data version from MLflow (downloaded through the server from S3), data from S3
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, capture_output=True)
    _use_s3_remote(clone, s3)
    (tmp_path / "recorded").mkdir()
    recorded = client.download_artifacts(champion.run_id, "pipeline/dvc.lock", str(tmp_path / "recorded"))
    (clone / "dvc.lock").write_bytes(Path(recorded).read_bytes())
    pulled = subprocess.run([sys.executable, "-m", "dvc", "pull", "--quiet"], cwd=clone,
                            env=clean_env(S3_CREDENTIALS), capture_output=True, text=True, timeout=600)
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
    workspace = project / "runs" / key_of("scheduled__s3")
    folders = ["data/raw", "data/processed", "models"]
    expected = _digests(workspace, folders)
    assert expected and _digests(clone, folders) == {k: v for k, v in expected.items()
                                                     if "/checkpoints/" not in k}

    # the champion, loaded from the registry with its files on S3, scores the pulled images;
    # the clone has no S3 credentials: the server reads the bucket for it
    scored = subprocess.run([sys.executable, "-m", "pipeline", "score", str(clone / "data" / "raw"), "--out",
                             str(tmp_path / "scores.csv")], cwd=clone,
                            env=clean_env({"MLFLOW_TRACKING_URI": tracking.uri}), capture_output=True, text=True,
                            timeout=600)
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    scores = pd.read_csv(tmp_path / "scores.csv")
    images = [p for p in (clone / "data" / "raw").rglob("*") if p.suffix in (".png", ".jpg", ".jpeg")]
    assert len(scores) == len(images) > 0
    assert scores["anomaly_score"].notna().all()
    assert set(scores["model_version"].astype(str)) == {str(champion.version)}
