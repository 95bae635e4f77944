"""The whole retraining in a scratch workspace, as a user runs it: real DVC, real
Great Expectations, real MLflow (SQLite store), real `mlflow models serve`.

One workspace serves the module; the tests run in order and build on each other:
a weak first model becomes champion, a better one replaces it, a worse one does not,
bad data stops the run, and the champion serves in a fresh process and over HTTP.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace, run_cli, set_params

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# first run: barely trained, and absolute gates low enough to let it in as the first champion
WEAK = {"train": {"epochs": 1, "learning_rate": 0.00001}}
LOW_GATES = {"gates": {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("e2e") / "project", {**WEAK, **LOW_GATES})


def _client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias(ws: Path, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(ws).get_model_version_by_alias("anomaly-detector", alias).version)
    except MlflowException:
        return None


def _versions(ws: Path) -> list[str]:
    return sorted(v.version for v in _client(ws).search_model_versions("name='anomaly-detector'"))


def test_first_run_registers_and_promotes_and_prints_a_summary(ws):
    result = run_cli(ws, "run")
    assert "retraining summary" in result.stdout
    assert "validation   passed" in result.stdout
    assert "v1 is now the champion" in result.stdout
    assert _alias(ws, "champion") == "1" and _alias(ws, "previous") is None
    version = _client(ws).get_model_version("anomaly-detector", "1")
    for tag in ("data_version", "git_commit", "git_dirty", "gate_status", "threshold", "run_id"):
        assert version.tags.get(tag), tag
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    raw_hash = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/raw")
    assert version.tags["data_version"] == raw_hash
    run = _client(ws).get_run(version.tags["run_id"])
    assert run.info.status == "FINISHED"
    assert len(_client(ws).get_metric_history(run.info.run_id, "train_loss")) == 1  # per epoch, live
    durations = json.loads((ws / "reports" / "train.json").read_text())["epoch_seconds"]
    assert len(durations) == 1 and durations[0] > 0  # each epoch's duration, beside its loss
    assert [round(m.value, 3) for m in _client(ws).get_metric_history(run.info.run_id, "epoch_seconds")] == durations
    artifacts = {a.path for a in _client(ws).list_artifacts(run.info.run_id)}
    assert {"plots", "validation", "pipeline", "environment", "gates"} <= artifacts
    assert (ws / "dvc-remote").is_dir() and any((ws / "dvc-remote").rglob("*"))  # data pushed


def test_dvc_repro_right_after_a_run_does_no_work(ws):
    before = (ws / "models" / "model.pt").stat().st_mtime_ns, (ws / "dvc.lock").read_text()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "Running stage" not in out
    assert ((ws / "models" / "model.pt").stat().st_mtime_ns, (ws / "dvc.lock").read_text()) == before


def test_a_run_with_nothing_changed_trains_nothing_and_registers_nothing(ws):
    """The no-op night: DVC runs no stage, register finds the same model (data, params, code,
    weights) as the champion and adds no version, promote leaves the champion."""
    result = run_cli(ws, "run")
    assert "Running stage" not in result.stdout
    assert "nothing changed since anomaly-detector v1" in result.stdout, result.stdout[-3000:]
    assert "registered   nothing: data, params, code and weights are those of anomaly-detector v1" in result.stdout
    assert "which is the champion already" in result.stdout
    assert len(_versions(ws)) == 1 and _alias(ws, "champion") == "1" and _alias(ws, "previous") is None
    run_id = json.loads((ws / "reports" / "gates.json").read_text())["run_id"]
    run = _client(ws).get_run(run_id)
    assert run.data.tags["unchanged_of"] == "1" and run.info.status == "FINISHED"


def test_a_better_model_takes_over_and_the_old_one_becomes_previous(ws):
    set_params(ws, train={"epochs": 8, "learning_rate": 0.003})
    result = run_cli(ws, "run")
    assert "v2 is now the champion" in result.stdout, result.stdout[-3000:]
    assert (_alias(ws, "champion"), _alias(ws, "previous")) == ("2", "1")
    metrics = json.loads((ws / "reports" / "metrics.json").read_text())
    assert metrics["auroc"] >= 0.9


def test_a_worse_model_is_registered_but_the_champion_stays(ws):
    set_params(ws, **WEAK)
    result = run_cli(ws, "run")
    assert "not promoted" in result.stdout and "worse than champion v2" in result.stdout
    assert (_alias(ws, "champion"), _alias(ws, "previous")) == ("2", "1")
    version = _client(ws).get_model_version("anomaly-detector", "3")
    assert version.tags["gate_status"] == "failed"
    assert "vs_champion_auroc" in version.tags["gates_failed"]
    assert "worse than champion v2" in version.tags["gate_reasons"]


def test_force_promotion_needs_a_reason_and_records_it_and_rollback_restores(ws):
    refused = run_cli(ws, "promote", "--version", "3", "--force", check=False)
    assert refused.returncode != 0 and "--reason" in refused.stderr
    run_cli(ws, "promote", "--version", "3", "--force", "--reason", "line 4 needs the new camera model")
    assert (_alias(ws, "champion"), _alias(ws, "previous")) == ("3", "2")
    tags = _client(ws).get_model_version("anomaly-detector", "3").tags
    assert tags["forced_promotion"] == "true" and tags["promotion_reason"] == "line 4 needs the new camera model"
    run_cli(ws, "rollback", "--reason", "forced model flags too much")
    assert (_alias(ws, "champion"), _alias(ws, "previous")) == ("2", "1")
    assert _client(ws).get_model_version("anomaly-detector", "3").tags["rollback_reason"] == "forced model flags too much"


def test_a_retried_register_reuses_the_version_its_run_made(ws):
    """A register killed after registering must not add a version when Airflow retries it."""
    before = _versions(ws)
    run_id = _client(ws).get_model_version("anomaly-detector", "3").run_id  # the last run: same params, same model
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "pipeline", "register"], cwd=ws, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "reusing anomaly-detector v3" in out.stdout
    assert _versions(ws) == before


def test_a_promote_killed_after_moving_the_alias_is_finished_by_its_retry(ws):
    client = _client(ws)
    champion, previous = _alias(ws, "champion"), _alias(ws, "previous")
    client.set_registered_model_alias("anomaly-detector", "champion", "3")  # moved, then killed:
    client.delete_model_version_tag("anomaly-detector", "3", "promoted_at")  # no record written
    try:
        run_cli(ws, "promote", "--version", "3", "--force", "--reason", "retry after a kill")
        tags = client.get_model_version("anomaly-detector", "3").tags
        assert tags["promoted_at"] and tags["promotion_reason"] == "retry after a kill"
        assert _alias(ws, "champion") == "3"
    finally:  # the later tests expect the champion of before
        client.set_registered_model_alias("anomaly-detector", "champion", champion)
        client.set_registered_model_alias("anomaly-detector", "previous", previous)


def _test_images(ws: Path, n: int = 6) -> list[Path]:
    good = sorted((ws / "data" / "landing" / "batch-0001" / "good").glob("*.png"))[:n // 2]
    bad = sorted((ws / "data" / "landing" / "batch-0001" / "scratch").glob("*.png"))[:n // 2]
    return good + bad


CONSUMER = r"""
import io, json, sys
import mlflow, pandas as pd
from PIL import Image
paths = sys.argv[1:]
images = [open(p, "rb").read() for p in paths]
buffer = io.BytesIO(); Image.open(paths[0]).convert("RGB").save(buffer, format="JPEG", quality=95)
images.append(buffer.getvalue())
model = mlflow.pyfunc.load_model("models:/anomaly-detector@champion")
out = model.predict(pd.DataFrame({"image": images}))
print(json.dumps({"columns": list(out.columns), "dtypes": [str(t) for t in out.dtypes],
                  "scores": out["anomaly_score"].tolist(), "flags": out["is_anomaly"].tolist()}))
"""


def test_champion_loads_and_scores_in_a_fresh_process_outside_the_repository(ws, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    files = [str(p) for p in _test_images(ws)]
    out = subprocess.run([sys.executable, "-c", CONSUMER, *files], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["columns"] == ["anomaly_score", "is_anomaly", "p_value"]
    assert result["dtypes"] == ["float64", "bool", "float64"]
    scores, flags = result["scores"], result["flags"]
    assert len(scores) == len(files) + 1
    threshold = float(_client(ws).get_model_version("anomaly-detector", "2").tags["threshold"])
    assert flags == [s > threshold for s in scores]
    assert max(scores[:3]) < min(scores[3:6])  # scratches score above good surfaces


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_invocations_like_the_pyfunc(ws, tmp_path):
    import mlflow
    import pandas as pd

    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                               "models:/anomaly-detector@champion", "--env-manager", "local", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not answer /ping in time"
            time.sleep(0.5)
        images = [p.read_bytes() for p in _test_images(ws)]
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[base64.b64encode(b).decode()] for b in images]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")  # process-global: every in-process load sets both
    mlflow.set_registry_uri(f"sqlite:///{ws / 'mlflow.db'}")
    local = mlflow.pyfunc.load_model("models:/anomaly-detector@champion").predict(pd.DataFrame({"image": images}))
    assert [row["is_anomaly"] for row in served] == local["is_anomaly"].tolist()
    assert [row["anomaly_score"] for row in served] == pytest.approx(local["anomaly_score"].tolist(), rel=1e-6)


def test_score_command_writes_a_table_and_names_a_broken_file(ws, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for path in _test_images(ws):
        (incoming / path.name).write_bytes(path.read_bytes())
    (incoming / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_cli(ws, "score", str(incoming), "--out", str(tmp_path / "scores.csv"))
    assert "NOT scored" in result.stdout and "broken.png" in result.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "scores.csv")
    assert len(table) == 7 and set(table["model_version"].astype(str)) == {"2"}
    assert table.loc[table["file"].str.endswith("broken.png"), "error"].str.contains("not an image").all()


@pytest.mark.parametrize("uri", ["runs:/0123456789abcdef/model", "/tmp/some/model", "models:/anomaly-detector/1/../2"])
def test_score_loads_models_only_from_the_configured_registry(ws, tmp_path, uri):
    """Loading a pyfunc runs its code: a model from anywhere else is refused before any download."""
    result = run_cli(ws, "score", str(tmp_path), "--model-uri", uri, check=False)
    assert result.returncode == 1
    assert f"refusing model URI {uri!r}: models load only from the configured registry" in result.stderr


def test_bad_data_stops_the_run_at_validation_and_nothing_is_registered(ws):
    versions, champion = _versions(ws), _alias(ws, "champion")
    (ws / "data" / "landing" / "batch-0001" / "good" / "zero_bytes.png").write_bytes(b"")
    result = run_cli(ws, "run", check=False)
    assert result.returncode != 0
    assert "validation   FAILED" in result.stdout
    assert "batch-0001/good/zero_bytes.png: empty file" in result.stdout
    assert "Running stage 'preprocess'" not in result.stdout
    assert _versions(ws) == versions and _alias(ws, "champion") == champion
    summary = json.loads((ws / "reports" / "validation" / "summary.json").read_text())
    assert not summary["success"]
    assert (ws / "reports" / "validation" / "report.html").read_text().count("zero_bytes.png") >= 1
