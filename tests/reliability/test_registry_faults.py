"""Faults around the model registry, against a real `mlflow server` on loopback that
the tests crash (SIGKILL of its process group) and start again on the same database.

- 8: the tracking server dies while register uploads the model; the retry (same MLflow
  run, as Airflow's retry has) registers exactly one version, and a version whose model
  files are incomplete is never promoted.
- 9: two promotions at once end on the better model, with the right ``previous``.
- 10: a candidate that fails its gates leaves the champion alone; rollback restores
  ``previous`` and records who and why.
- 13: the champion moved since a candidate was gated, and promote's re-check cannot do
  its job: the alias cannot be read (the server stops at that moment), or the new champion
  cannot be re-scored (its weights corrupted in the store). Promotion refuses, naming why.

Every project here logs to the same server; the champion is read back from it after
each fault, so "nothing lost" is checked against the registry itself.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, dvc, make_workspace, run_cli
from servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NAME = "anomaly-detector"
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}
WEAK = {"epochs": 1, "learning_rate": 0.00001}        # AUROC about 0.82 on the tiny data
FAIR = {"epochs": 1, "learning_rate": 0.001}          # about 0.89: better than WEAK, worse than GOOD
GOOD = {"epochs": 8, "learning_rate": 0.003}          # about 0.97
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def _project(root: Path, server: MlflowServer, train: dict) -> Path:
    return make_workspace(root, {"train": train, "gates": LOW_GATES, "registry": {"tracking_uri": server.uri}})


@pytest.fixture(scope="module")
def ws(server, tmp_path_factory) -> Path:
    """A project whose first (weak) model is the champion, v1."""
    root = _project(tmp_path_factory.mktemp("registry") / "project", server, WEAK)
    run_cli(root, "run")
    return root


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def _alias(server: MlflowServer, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(server).get_model_version_by_alias(NAME, alias).version)
    except MlflowException:
        return None


def _versions(server: MlflowServer) -> list[int]:
    return sorted(int(v.version) for v in _client(server).search_model_versions(f"name='{NAME}'"))


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def test_8_server_dies_during_register_and_the_retry_registers_exactly_one_clean_version(ws, server):
    assert (_alias(server, "champion"), _versions(server)) == ("1", [1])
    client = _client(server)
    # this workspace's model is v1's: without its fingerprint, register registers it again
    # (as it would a model registered before fingerprints existed) instead of finding v1
    client.delete_model_version_tag(NAME, "1", "model_fingerprint")
    experiment = client.get_experiment_by_name(NAME).experiment_id
    run_id = client.create_run(experiment, tags={"trigger": "test"}).info.run_id  # as prepare does
    env = {**FAIL_FAST, "MLFLOW_RUN_ID": run_id}
    before = _files(Path(server.artifacts))

    first = subprocess.Popen([sys.executable, "-m", "pipeline", "register"], cwd=ws, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=clean_env(env))
    deadline = time.monotonic() + 300
    while not any("/models/" in p.as_posix() for p in _files(Path(server.artifacts)) - before):  # the model's upload began
        assert first.poll() is None, "register ended before it uploaded a model: " + first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "register never started uploading the model"
        time.sleep(0.02)
    server.crash()
    output = first.communicate(timeout=300)[0]
    assert first.returncode != 0, output[-3000:]  # failed, never a success
    assert server.uri in output, output[-3000:]  # the error names the server it could not reach

    server.start()
    assert _alias(server, "champion") == "1"  # the champion survived the crash
    retry = run_cli(ws, "register", env=env)
    assert "register: anomaly-detector v" in retry.stdout
    made = client.search_model_versions(f"name='{NAME}' and run_id='{run_id}'")
    assert len(made) == 1, [v.version for v in made]  # exactly one version for the run
    version = made[0]
    assert version.status == "READY" and _versions(server) == [1, int(version.version)]
    assert client.get_run(run_id).info.status == "FINISHED"
    run_cli(ws, "promote", "--version", str(version.version))  # it is whole: it loads, so it may serve
    assert (_alias(server, "champion"), _alias(server, "previous")) == (str(version.version), "1")


def test_8_a_version_whose_model_files_are_incomplete_is_never_promoted(ws, server, tmp_path):
    import mlflow

    client = _client(server)
    champion = _alias(server, "champion")
    mlflow.set_tracking_uri(server.uri)  # process-global: every in-process load sets both
    mlflow.set_registry_uri(server.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{champion}", dst_path=str(tmp_path / "m")))
    weights = [p for p in local.rglob("*.pt")]
    assert weights, list(local.rglob("*"))
    for path in weights:  # the upload stopped before the weights
        path.unlink()
    experiment = client.get_experiment_by_name(NAME).experiment_id
    run = client.create_run(experiment, tags={"trigger": "test-partial-upload"})
    client.log_artifacts(run.info.run_id, str(local), "model")
    partial = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert client.get_model_version(NAME, partial.version).status == "READY"  # the registry cannot tell

    refused = run_cli(ws, "promote", "--version", str(partial.version), "--force", "--reason", "test", check=False)
    assert refused.returncode == 1
    assert f"v{partial.version} does not load, not promoted" in refused.stderr
    assert _alias(server, "champion") == champion
    client.delete_model_version(NAME, partial.version)  # the later tests count versions


PROMOTE = [sys.executable, "-m", "pipeline", "promote"]


def _gated(server: MlflowServer, folder: Path, train: dict) -> tuple[Path, str]:
    """A project trained with ``train`` and registered (gated against today's champion), not promoted."""
    root = _project(folder, server, train)
    dvc(root, "repro", "--quiet")
    out = run_cli(root, "register").stdout
    assert "all gates passed" in out, out[-2000:]
    return root, out.split("register: anomaly-detector v", 1)[1].split()[0]


@pytest.fixture(scope="module")
def candidates(ws, server, tmp_path_factory):
    """Two candidates gated against the same champion: a fair one and a good one."""
    folder = tmp_path_factory.mktemp("candidates")
    champion = _alias(server, "champion")
    fair, fair_version = _gated(server, folder / "fair", FAIR)
    good, good_version = _gated(server, folder / "good", GOOD)
    return champion, (fair, fair_version), (good, good_version)


def _reset(server: MlflowServer, champion: str, previous: str | None) -> None:
    client = _client(server)
    client.set_registered_model_alias(NAME, "champion", champion)
    if previous:
        client.set_registered_model_alias(NAME, "previous", previous)


def test_9_two_promotions_at_once_end_on_the_better_model(server, candidates):
    champion, (fair, fair_version), (good, good_version) = candidates
    previous = _alias(server, "previous")
    both = [subprocess.Popen(PROMOTE, cwd=root, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for root in (fair, good)]
    outputs = [p.communicate(timeout=600)[0] for p in both]
    assert both[1].returncode == 0 and both[0].returncode in (0, 3), outputs  # 3: fair was not promoted
    assert _alias(server, "champion") == good_version, outputs
    good_tags = _client(server).get_model_version(NAME, good_version).tags
    if "NOT promoted" in outputs[0]:  # good went first; fair, re-gated against it, stayed out
        assert _alias(server, "previous") == champion == good_tags["promoted_over"]
    else:  # fair went first; good then replaced it
        assert _alias(server, "previous") == fair_version == good_tags["promoted_over"]
    _reset(server, champion, previous)


@pytest.mark.parametrize("order", ["fair first", "good first"])
def test_9_either_order_of_two_promotions_ends_on_the_better_model(server, candidates, order):
    champion, (fair, fair_version), (good, good_version) = candidates
    previous = _alias(server, "previous")
    first, second = ((fair, good) if order == "fair first" else (good, fair))
    outputs = [run_cli(first, "promote").stdout, run_cli(second, "promote", check=False)]
    assert _alias(server, "champion") == good_version
    if order == "fair first":
        assert _alias(server, "previous") == fair_version  # good replaced fair, which had replaced the champion
    else:
        second_out = outputs[1]
        assert second_out.returncode == 3 and "champion moved to v" + good_version in second_out.stdout
        assert "worse than champion v" + good_version in second_out.stdout
        assert _alias(server, "previous") == champion
        tags = _client(server).get_model_version(NAME, fair_version).tags
        assert tags["gate_status"] == "failed" and f"re-gated at promotion against v{good_version}" in \
            tags["gate_reasons"]
    _reset(server, champion, previous)


def test_10_failed_gates_keep_the_champion_and_rollback_restores_previous_with_who_and_why(server, candidates):
    champion, (fair, fair_version), (good, good_version) = candidates
    run_cli(good, "promote")
    assert (_alias(server, "champion"), _alias(server, "previous")) == (good_version, champion)
    result = run_cli(fair, "run")  # the fair model again, now against the good champion
    assert "not promoted" in result.stdout and f"worse than champion v{good_version}" in result.stdout
    assert (_alias(server, "champion"), _alias(server, "previous")) == (good_version, champion)

    back = run_cli(fair, "rollback", "--reason", "good model flags too much on line 3")
    assert f"champion v{good_version} -> v{champion}" in back.stdout
    assert _alias(server, "champion") == champion
    tags = _client(server).get_model_version(NAME, good_version).tags
    assert tags["rollback_reason"] == "good model flags too much on line 3" and tags["rolled_back_by"]
    restored = _client(server).get_model_version(NAME, champion).tags
    assert restored["restore_reason"] == "good model flags too much on line 3" and restored["restored_by"]


# 13: the promotion's re-check, when it cannot do its job. A candidate is gated against one
# champion; by the time it is promoted the champion has moved (another promotion), so promote
# re-reads the alias and re-scores the new champion on the candidate's test split. Neither
# the read nor the scoring may fail open.

RECHECKED = {"epochs": 2, "learning_rate": 0.001}  # a model of its own (not a twin of FAIR or GOOD)


@pytest.fixture(scope="module")
def recheck_candidate(ws, server, tmp_path_factory):
    """A candidate whose gates passed against today's champion; not promoted."""
    champion = _alias(server, "champion")
    root, version = _gated(server, tmp_path_factory.mktemp("recheck") / "candidate", RECHECKED)
    return champion, root, version


def test_13_the_champion_alias_cannot_be_read_at_promotion_and_nothing_moves(server, recheck_candidate,
                                                                               monkeypatch):
    """The server stops at the moment promote re-reads the champion alias (in this process,
    so the fault lands exactly there): the promotion is refused with an error that says the
    alias could not be read, and after the restart both aliases are as they were."""
    from pipeline import registry
    from pipeline.io import StageError
    from pipeline.orchestrate import project_layout
    from pipeline.stages import promote

    champion, root, version = recheck_candidate
    previous = _alias(server, "previous")
    for key, value in FAIL_FAST.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    read_alias = registry.alias_version
    reads = []

    def server_dies_first(client, name, alias):
        reads.append(alias)
        server.crash()
        return read_alias(client, name, alias)

    monkeypatch.setattr(registry, "alias_version", server_dies_first)
    try:
        with pytest.raises(StageError) as refused:
            promote.run(project_layout(root))
    finally:
        monkeypatch.setattr(registry, "alias_version", read_alias)
        server.start()
    assert reads == ["champion"]  # the fault hit the re-read, not anything before it
    message = str(refused.value)
    assert f"the 'champion' alias of {NAME} could not be read" in message and f"v{version} was not promoted" in message
    assert "127.0.0.1" in message  # the cause: the server it could not reach
    assert (_alias(server, "champion"), _alias(server, "previous")) == (champion, previous)
    assert "promoted_at" not in _client(server).get_model_version(NAME, version).tags


def test_13_a_new_champion_that_cannot_be_rescored_blocks_the_promotion(server, recheck_candidate, tmp_path):
    """The champion moved (to a whole model, which loaded when it took over); then its weights
    are corrupted in the artifact store. Re-scoring it fails, so the candidate, which was never
    compared with it, is refused; the champion stays, and the candidate's version says why."""
    import mlflow

    champion, root, version = recheck_candidate
    client = _client(server)
    previous = _alias(server, "previous")
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_registry_uri(server.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{champion}", dst_path=str(tmp_path / "m")))
    experiment = client.get_experiment_by_name(NAME).experiment_id
    run_id = client.create_run(experiment, tags={"trigger": "test-moved-champion"}).info.run_id
    client.log_artifacts(run_id, str(local), "model")
    moved = str(client.create_model_version(NAME, f"runs:/{run_id}/model", run_id).version)
    mlflow.pyfunc.load_model(f"models:/{NAME}/{moved}")  # whole when it took over
    client.set_registered_model_alias(NAME, "previous", champion)
    client.set_registered_model_alias(NAME, "champion", moved)
    stored = [p for p in Path(server.artifacts).rglob("*.pt") if run_id in p.as_posix()]
    assert stored, "the moved champion's weights are not in the server's artifact store"
    for path in stored:  # lost afterwards: a bad disk, a bucket policy, a hand in the bucket
        path.write_bytes(b"not a torch file")
    try:
        refused = run_cli(root, "promote", check=False)
        assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert f"the champion moved to v{moved}" in refused.stdout
        assert f"champion v{moved} could not be scored on this test split" in refused.stdout  # the cause
        assert "not promoted over a champion it could not be compared with" in refused.stdout
        assert (_alias(server, "champion"), _alias(server, "previous")) == (moved, champion)
        tags = client.get_model_version(NAME, version).tags
        assert tags["gate_status"] == "failed" and tags["gated_against"] == moved and "promoted_at" not in tags
        assert f"champion v{moved} could not be scored" in tags["gate_reasons"]
    finally:
        _reset(server, champion, previous)
        if previous is None:
            client.delete_registered_model_alias(NAME, "previous")
        client.delete_model_version(NAME, moved)  # the other tests count versions
