"""Faults that hit the real stage processes, as an operator meets them: a training
killed outright, a task told to stop, a damaged checkpoint, a stage killed while it
writes its outputs, a loss that diverges.

Everything is real: `dvc repro` and `python -m pipeline` run as processes in scratch
workspaces, signals are real signals sent to them, and each test ends by checking that
nothing was lost (the final weights equal those of a run that was never interrupted,
bit for bit, on the CPU).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import DRIVER, clean_env, dvc, make_workspace, run_cli, set_params, start

pytestmark = pytest.mark.slow

# About 0.03 s each with TINY_PARAMS since the channels-last weights (0.1 s before): 30 epochs
# ended before a SIGTERM sent after epoch 2's checkpoint and a walk of the process tree landed,
# on a loaded machine. 120 leave it a few seconds.
EPOCHS = 120
# a checkpoint after every epoch (params.yaml's 60 s would write only the last one here)
PARAMS = {"train": {"epochs": EPOCHS, "checkpoint_every_s": 0}}
LOW_GATES = {"min_auroc": 0.0, "min_average_precision": 0.0, "max_fpr": 1.0}





def wait_for(condition, what: str, timeout: float = 300, process: subprocess.Popen | None = None,
             log: Path | None = None, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit {process.returncode}) before {what}\n"
                                 + (log.read_text()[-4000:] if log else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def epochs_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name[6:10]) for p in folder.glob("epoch-*.pt")) if folder.is_dir() else []


def weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(got: dict, expected: dict) -> None:
    import torch

    assert got.keys() == expected.keys()
    different = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace with ingest, validate and preprocess done (by dvc repro); tests copy it."""
    root = make_workspace(tmp_path_factory.mktemp("prepared") / "project", PARAMS)
    dvc(root, "repro", "preprocess")
    return root


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory) -> tuple[Path, dict]:
    """The same data and params trained without any interruption: the weights to reach."""
    root = copy(prepared, tmp_path_factory.mktemp("reference") / "project")
    dvc(root, "repro", "train")
    return root, weights(root / "models" / "model.pt")


def kill_training(root: Path, log: Path, after_epoch: int) -> list[int]:
    """dvc repro train, SIGKILLed (dvc and the stage, the whole group) once a checkpoint
    of ``after_epoch`` is on disk; returns the epochs whose checkpoints survived."""
    checkpoints = root / "models" / "checkpoints"
    process = start(root, [sys.executable, "-m", "dvc", "repro", "train"], log)
    try:
        wait_for(lambda: max(epochs_on_disk(checkpoints), default=0) >= after_epoch,
                 f"checkpoint of epoch {after_epoch}", process=process, log=log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    done = epochs_on_disk(checkpoints)
    assert after_epoch <= done[-1] < EPOCHS, f"the kill did not land mid-training: {done}"
    assert not (root / "models" / "model.pt").exists()
    return done


def test_training_killed_by_sigkill_resumes_from_its_last_checkpoint_to_the_same_weights(prepared, reference,
                                                                                        tmp_path):
    """Fault 3: the training process and DVC are SIGKILLed (OOM killer, lost node) after a
    checkpoint. The retry resumes from the last checkpoint; the final weights equal an
    uninterrupted run's bit for bit."""
    root = copy(prepared, tmp_path / "project")
    done = kill_training(root, tmp_path / "killed.log", after_epoch=2)

    retry = dvc(root, "repro", "train")  # DVC's lock of the killed process is stale, not an obstacle
    output = retry.stdout + retry.stderr
    assert f"resuming from checkpoint epoch-{done[-1]:04d}.pt" in output, output[-3000:]
    train_metrics = json.loads((root / "reports" / "train.json").read_text())
    assert train_metrics["resumed_from_epoch"] == done[-1]
    history = (root / "reports" / "train_history.csv").read_text().splitlines()
    assert len(history) == EPOCHS + 1  # header + every epoch, the ones before the kill included
    assert_same_weights(weights(root / "models" / "model.pt"), reference[1])
    assert not list((root / "models" / "checkpoints").glob("*.tmp"))
    assert "up to date" in dvc(root, "status", "train").stdout


class _RunsCode:
    """Unpickling this runs `open(marker, "w")`: what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_checkpoint_and_a_planted_pickle_are_skipped_for_the_last_good_one(prepared, reference,
                                                                                    tmp_path):
    """Fault 5: after a killed training the newest checkpoint is truncated and a newer
    "checkpoint" that would run code when unpickled is planted. The retry warns about
    both, resumes from the last good epoch, never runs the planted code, and still
    reaches the uninterrupted weights."""
    import torch

    root = copy(prepared, tmp_path / "project")
    checkpoints = root / "models" / "checkpoints"
    done = kill_training(root, tmp_path / "killed.log", after_epoch=3)
    newest, good = done[-1], done[-2]

    truncated = checkpoints / f"epoch-{newest:04d}.pt"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    marker = tmp_path / "code-ran"
    planted = checkpoints / f"epoch-{newest + 1:04d}.pt"
    torch.save({"epoch": newest + 1, "model": _RunsCode(marker)}, planted)
    # the planted file really is dangerous: a full unpickle runs its code
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                            str(planted)], cwd=Path(__file__).parent, env=clean_env(), capture_output=True, text=True)
    assert marker.exists(), probe.stderr[-2000:]
    marker.unlink()

    retry = dvc(root, "repro", "train")
    output = retry.stdout + retry.stderr
    assert f"skipping unreadable checkpoint {planted.name}: Weights only load failed" in output, output[-3000:]
    assert f"skipping unreadable checkpoint {truncated.name}" in output
    assert f"resuming from checkpoint epoch-{good:04d}.pt" in output
    assert json.loads((root / "reports" / "train.json").read_text())["resumed_from_epoch"] == good
    assert not marker.exists(), "loading a checkpoint ran code"
    assert_same_weights(weights(root / "models" / "model.pt"), reference[1])
    for path in checkpoints.glob("epoch-*.pt"):  # the damaged and planted files were replaced by real ones
        assert weights(path)["epoch"] == int(path.name[6:10])


def _tree(pid: int) -> list:
    import psutil

    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def _alive(processes) -> list:
    import psutil

    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("target", ["task process", "task process group"])
def test_sigterm_to_the_train_task_stops_its_whole_tree_and_fails_it(prepared, reference, tmp_path, target):
    """Fault 4: the Airflow task (a process calling pipeline.orchestrate.stage, which runs
    `dvc repro --single-item train`, which runs `python -m pipeline train`) gets SIGTERM,
    as on execution_timeout or a run marked failed: either the task process alone, or its
    whole process group as Airflow 3's supervisor sends it. The task exits non-zero, no
    process of its tree survives, the checkpoints on disk are whole, DVC does not record
    train as done, and the retry resumes to the uninterrupted weights."""
    project = copy(prepared, tmp_path / "project")
    run_id = "manual__sigterm"
    workspace = project / "runs" / run_id
    driver = [sys.executable, "-c", DRIVER, str(project), run_id]
    subprocess.run([*driver, "ingest", "validate", "preprocess"], cwd=project, env=clean_env(), check=True,
                   capture_output=True, timeout=600)

    log = tmp_path / "task.log"
    task = start(project, [*driver, "train"], log)
    checkpoints = workspace / "models" / "checkpoints"
    wait_for(lambda: max(epochs_on_disk(checkpoints), default=0) >= 2, "checkpoint of epoch 2", process=task,
             log=log)
    tree = _tree(task.pid)
    commands = [" ".join(p.cmdline()) for p in tree]
    assert any("dvc" in c and "repro --single-item train" in c for c in commands), commands  # pipeline.dvc_cli
    assert any("-m pipeline train" in c for c in commands), commands
    if target == "task process":
        os.kill(task.pid, signal.SIGTERM)
    else:
        os.killpg(task.pid, signal.SIGTERM)
    code = task.wait(timeout=60)

    output = log.read_text()
    assert code != 0, output[-3000:]
    assert "got SIGTERM while running 'dvc repro --single-item train'" in output or \
        "train: stopped by SIGTERM" in output, output[-3000:]
    wait_for(lambda: not _alive(tree), "every process of the task's tree to end", timeout=30)
    done = epochs_on_disk(checkpoints)
    assert done and done[-1] < EPOCHS
    newest = weights(checkpoints / f"epoch-{done[-1]:04d}.pt")
    assert newest["epoch"] == done[-1] and len(newest["history"]) == done[-1]
    assert not list(checkpoints.glob("*.tmp"))
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert "preprocess" in lock["stages"] and "train" not in lock["stages"]
    assert not (workspace / "models" / "model.pt").exists()

    if target == "task process":  # the retry Airflow makes: same run, same workspace
        retry = subprocess.run([*driver, "train"], cwd=project, env=clean_env(), capture_output=True, text=True,
                               timeout=600)
        assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
        assert f"resuming from checkpoint epoch-{done[-1]:04d}.pt" \
            in retry.stdout + retry.stderr
        assert_same_weights(weights(workspace / "models" / "model.pt"), reference[1])
        assert "train" in yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]


def test_preprocess_killed_while_writing_its_arrays_is_redone_and_nothing_half_written_is_used(tmp_path):
    """Fault 7a: `dvc repro` is SIGKILLed while preprocess writes its first array. No file
    exists under an output's final name, DVC sees the stage as not done, and the next
    `dvc repro` redoes it to the bytes of an uninterrupted preprocess."""
    from components.synthetic import BatchSpec, write_batch

    root = make_workspace(tmp_path / "project", PARAMS, with_data=False)
    # large source images, so that writing the train split takes a few tenths of a second
    write_batch(root / "data" / "landing", "batch-0001", seed=7, spec=BatchSpec(n_good=150, n_per_defect=15,
                                                                                 size=256))
    dvc(root, "repro", "validate")
    processed = root / "data" / "processed"

    def partial_arrays() -> list[Path]:
        """The array being written, under a temporary name: the file itself, or inside a
        temporary copy of the whole output folder."""
        return [*processed.parent.glob(".processed.tmp*/train_images.npy"),
                *processed.glob(".train_images.npy.tmp*")]

    def final_outputs() -> list[str]:
        return sorted(p.name for p in processed.iterdir() if not p.name.startswith(".")) \
            if processed.is_dir() else []

    log = tmp_path / "preprocess.log"
    process = start(root, [sys.executable, "-m", "dvc", "repro", "preprocess"], log)
    try:
        wait_for(lambda: bool(partial_arrays()), "preprocess to start writing its train array", process=process,
                 log=log, poll=0.002)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert partial_arrays(), "killed mid-write: the half-written array is there, under its temporary name"
    assert final_outputs() == [], "an output appeared under its final name"
    assert "preprocess" in dvc(root, "status", "preprocess").stdout
    assert "preprocess" not in yaml.safe_load((root / "dvc.lock").read_text())["stages"]

    again = dvc(root, "repro", "preprocess")
    assert "Running stage 'preprocess'" in again.stdout
    assert not list(processed.glob(".*"))
    assert not list(processed.parent.glob(".processed.tmp*")), "the killed run's half-written copy is removed"
    recovered = {p.name: md5(p) for p in processed.iterdir()}
    assert set(recovered) >= {"train_images.npy", "calibration_images.npy", "test_images.npy", "index.parquet"}
    dvc(root, "repro", "--force", "--single-item", "preprocess")  # an uninterrupted preprocess
    assert {p.name: md5(p) for p in processed.iterdir()} == recovered
    assert "up to date" in dvc(root, "status", "preprocess").stdout


def test_an_output_truncated_behind_dvcs_back_is_restored_before_training_uses_it(reference, tmp_path):
    """Fault 7b: after a good run, something outside the pipeline truncates a
    preprocess output. `dvc status` reports it modified, `dvc repro` restores it (from
    DVC's run cache) and train, whose input is then unchanged, is not rerun on it."""
    root = copy(reference[0], tmp_path / "project")
    array = root / "data" / "processed" / "train_images.npy"
    good, model = md5(array), md5(root / "models" / "model.pt")
    array.write_bytes(array.read_bytes()[:1000])

    status = dvc(root, "status", "preprocess").stdout
    assert "changed outs" in status and "modified:" in status and "data/processed" in status, status
    assert "data/processed" in dvc(root, "status", "train").stdout  # train's input no longer matches its lock
    repro = dvc(root, "repro", "train")
    assert "Stage 'train' didn't change, skipping" in repro.stdout, repro.stdout[-3000:]
    assert md5(array) == good
    assert md5(root / "models" / "model.pt") == model
    assert "up to date" in dvc(root, "status", "train").stdout


def test_a_diverging_loss_stops_the_run_and_leaves_the_champion_alone(reference, tmp_path):
    """Fault 11: with a champion in place, a run whose loss overflows (Deep SAD's anomaly
    weight train.eta set absurdly high; no learning rate the config accepts makes this
    model diverge) stops at train with exit 4 (DataError: a retry would fail the same
    way) and a message that says the loss diverged and what to change. No version is
    registered, the champion stays, and the MLflow run is FAILED at train."""
    from mlflow import MlflowClient

    root = copy(reference[0], tmp_path / "project")
    set_params(root, gates=LOW_GATES)
    run_cli(root, "run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("anomaly-detector", "champion").version
    versions = sorted(v.version for v in client.search_model_versions("name='anomaly-detector'"))

    set_params(root, train={"eta": 1e39})
    result = run_cli(root, "run", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 4, output[-4000:]
    assert "train: the loss diverged: it became inf at epoch 1" in result.stderr, output[-4000:]
    assert "Lower train.learning_rate, or train.eta" in result.stderr
    assert "Running stage 'calibrate'" not in result.stdout
    assert sorted(v.version for v in client.search_model_versions("name='anomaly-detector'")) == versions
    assert client.get_model_version_by_alias("anomaly-detector", "champion").version == champion
    experiment = client.get_experiment_by_name("anomaly-detector")
    newest = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0]
    assert newest.info.status == "FAILED"
    assert newest.data.tags["failed_stage"] == "train"
    assert "the loss diverged" in newest.data.tags["error"]
