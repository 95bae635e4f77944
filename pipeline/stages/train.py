"""train: fit the detector on the train split, checkpoint it (``train.checkpoint_every_s``),
and score the held-out splits once, so calibrate and evaluate need no torch and no second
model load.

When the pipeline runner sets MLFLOW_RUN_ID, per-epoch losses go to that MLflow run live.

SIGTERM (sent by Airflow, by the task that runs DVC, or by a node being drained) ends
the stage with an error instead of killing it mid-write: temporary files are removed,
the checkpoints already written stay, and the retry resumes from the last one.

With ``train.devices`` above 1 the stage starts itself again under torchrun, one process
per device (GPUs with NCCL; CPU processes with gloo where there is no GPU), and they train
one model with DistributedDataParallel (components/training.py). The first process writes
every output; the others only train.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from detector.backbones import FEATURE_FAMILIES
from pipeline.io import DataError, StageError, atomic_path, write_json
from pipeline.kinds import kind_of
from pipeline.layout import Layout


def model_spec(layout: Layout) -> dict:
    return kind_of(layout.config).model_spec(layout)


def _fingerprint(layout: Layout, spec: dict, settings, processes: int = 1) -> str:
    """Checkpoints are resumed only by a run with this exact model, settings and data, and
    with as many processes (a multi-process run's share of the cores, derived from this
    machine's, is left out: a retry on another node resumes all the same)."""
    identity = dict(settings.__dict__)
    identity.pop("checkpoint_every_s")  # when checkpoints are written, not what they hold
    if processes > 1:
        identity.update(num_threads=layout.config.train.num_threads, processes=processes)
    digest = hashlib.sha256(json.dumps([spec, identity], sort_keys=True).encode())
    digest.update(layout.index.read_bytes())
    return digest.hexdigest()


def _epoch_logger():
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    import mlflow
    from mlflow.entities import Metric

    run_id = os.environ["MLFLOW_RUN_ID"]
    client = mlflow.MlflowClient()

    def log(epoch: int, record: dict) -> None:  # one request per epoch, however many metrics
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric("train_loss", record["train_loss"], now, epoch),
                                          Metric("epoch_seconds", record["seconds"], now, epoch)])

    return log


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that no ``except Exception`` on the way (a
    checkpoint that fails to load, MLflow's client) can take it for an ordinary error."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# evaluate's overlays need where the defect is, not every pixel: 64 x 64 float16 is 8 KB a test
# image in scores.parquet (a 224 px map would be 100 KB; PatchCore's own grid is 28 x 28 there)
MAP_SIDE = 64

# Under torchrun: where a process that refuses the data (a diverged loss) leaves its message,
# so that the launching stage fails as a data error too (no retry), not as torchrun's exit 1
REFUSAL_FILE_ENV = "ANOMALY_PIPELINE_TRAIN_REFUSAL"


def run(layout: Layout) -> dict:
    try:
        with _sigterm_raises():
            if layout.config.train.devices > 1 and "LOCAL_RANK" not in os.environ:
                return _launch(layout, layout.config.train.devices)
            try:
                return _run(layout)
            except DataError as refused:
                if os.environ.get(REFUSAL_FILE_ENV):
                    with open(os.environ[REFUSAL_FILE_ENV], "w") as handle:
                        handle.write(str(refused))
                raise
    except _Terminated as signalled:
        raise StageError(f"train: stopped by {signalled}; the checkpoints written so far are kept in "
                         f"{layout.checkpoints} and a retry resumes from the last one") from None


def _launch(layout: Layout, processes: int) -> dict:
    """This stage again, under torchrun, in ``processes`` processes on this machine.

    torchrun passes a SIGTERM on to its processes, which stop as a single process does;
    when this process is stopped (the SIGTERM raised here) it stops torchrun first."""
    import subprocess
    import sys

    from pipeline.io import read_json

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "pipeline", "--params", str(layout.root / "params.yaml"), "train"]
    print(f"train: {processes} processes with DistributedDataParallel (train.devices): {' '.join(command[1:])}",
          flush=True)
    import tempfile

    refusal = Path(tempfile.mkdtemp(prefix="train-")) / "refused.txt"
    launcher = subprocess.Popen(command, cwd=layout.root, env={**os.environ, REFUSAL_FILE_ENV: str(refusal)})
    try:
        code = launcher.wait()
    except BaseException:
        launcher.terminate()
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            launcher.kill()
        raise
    finally:
        refused = refusal.read_text() if refusal.is_file() else ""
        shutil.rmtree(refusal.parent, ignore_errors=True)
    if code != 0 and refused:
        raise DataError(refused)
    if code != 0:
        raise StageError(f"train: the {processes} training processes failed (torchrun exit {code}); their "
                         "errors are in the output above. The checkpoints of finished epochs are kept in "
                         f"{layout.checkpoints}")
    return read_json(layout.train_metrics)


def _join_process_group(device_preference: str) -> tuple[int, int]:
    """Under torchrun: this process's (rank, world size) in the group, on its own GPU."""
    import torch
    import torch.distributed as dist

    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return 0, 1
    cuda = device_preference != "cpu" and torch.cuda.is_available()
    if cuda:
        if torch.cuda.device_count() < world:
            raise StageError(f"train: train.devices is {world} but this machine has {torch.cuda.device_count()} "
                             "GPU(s); set train.devices to at most that (or train.device: cpu)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def _run(layout: Layout) -> dict:
    try:
        rank, world = _join_process_group(layout.config.train.device)
        return _train_and_write(layout, rank, world)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train_and_write(layout: Layout, rank: int, world: int) -> dict:
    import torch

    from detector.backbones import BackboneWeightsError
    from components.training import TrainingDivergedError, TrainSettings, train
    from detector.scoring import score, score_and_maps

    config = layout.config
    index = pd.read_parquet(layout.index)
    train_rows = index[index["split"] == "train"].sort_values("row")
    images = np.load(layout.split_items("train"), mmap_mode="r")
    if config.model.type == "classifier" and "labelled" in train_rows and not train_rows["labelled"].all():
        # unlabelled records train Deep SAD and the autoencoder as normal (most records are), but
        # a supervised classifier would learn the unlabelled fraud among them as normal
        keep = train_rows["labelled"].to_numpy(bool)
        images, train_rows = np.asarray(images)[train_rows["row"].to_numpy()[keep]], train_rows[keep]
    threads = config.train.num_threads
    if world > 1 and threads == 0:  # "all cores", shared by the processes on this machine
        threads = max(1, (os.cpu_count() or 1) // world)
    settings = TrainSettings(
        epochs=config.train.epochs, batch_size=config.train.batch_size, learning_rate=config.train.learning_rate,
        weight_decay=config.train.weight_decay, seed=config.base.seed, device=config.train.device,
        num_threads=threads, checkpoint_every_s=config.train.checkpoint_every_s)
    spec = model_spec(layout)
    # torch.optim imports torch._dynamo at the first step (3-8 s here): start-up, not training,
    # so it is paid before the clock starts and samples_per_second measures the training
    if spec["family"] not in FEATURE_FAMILIES:  # the feature families take no optimiser step
        import torch._dynamo  # noqa: F401
    started = time.perf_counter()
    try:
        result = train(spec, images, train_rows["is_anomaly"].to_numpy(np.float32), settings,
                       checkpoint_dir=layout.checkpoints, fingerprint=_fingerprint(layout, spec, settings, world),
                       on_epoch=_epoch_logger() if rank == 0 else None)
    except TrainingDivergedError as error:
        eta = ", or train.eta (the weight of labelled anomalies)" if spec["family"] == "deep_sad" else ""
        raise DataError(f"train: {error}. Lower train.learning_rate{eta}, or check the training data. "
                        "No model was written, so nothing will be registered") from None
    except BackboneWeightsError as error:  # a setting to fix: retrying changes nothing, but a download may
        if config.model.backbone_weights == "download":
            raise StageError(f"train: {error}") from None
        raise DataError(f"train: {error}. Nothing was fitted, so nothing will be registered") from None
    except ValueError as error:
        raise StageError(f"train: {error}") from None
    seconds = time.perf_counter() - started
    if rank != 0:  # the first process writes the outputs
        return {}

    layout.models.mkdir(parents=True, exist_ok=True)
    with atomic_path(layout.weights) as tmp, open(tmp, "wb") as handle:
        # to a handle, so the archive's inner folder name does not come from the temporary
        # file's name: equal weights give equal bytes (reproduce compares the hash)
        torch.save({k: v.cpu() for k, v in result.model.state_dict().items()}, handle)
    write_json(layout.spec, {"spec": result.spec, **kind_of(config).served_spec(layout, spec)})

    parts = []
    for split in ("calibration", "test"):
        rows = index[index["split"] == split].sort_values("row").copy()
        images = np.load(layout.split_items(split), mmap_mode="r")
        if spec["family"] in FEATURE_FAMILIES and split == "test":
            # the test split's anomaly maps too (float16 bytes, at most MAP_SIDE square), for evaluate's overlays
            rows["score"], maps = score_and_maps(result.model, images, batch_size=settings.batch_size,
                                                 map_size=MAP_SIDE)
            rows["anomaly_map"] = [m.astype(np.float16).tobytes() for m in maps]
        else:
            # in training's batches: score's default (256) took ~100 MB more than the training loop
            # and set the stage's peak (benchmarks/scale.py)
            rows["score"] = score(result.model, images, batch_size=settings.batch_size)
        parts.append(rows)
    scores = pd.concat(parts, ignore_index=True)
    if not np.isfinite(scores["score"]).all():
        raise RuntimeError("the trained model gives NaN or infinite scores; nothing downstream may use it")
    with atomic_path(layout.scores) as tmp:
        scores.to_parquet(tmp, index=False)

    with atomic_path(layout.train_history) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "train_loss"])
        writer.writeheader()  # no timings: the same data and settings give the same file (DVC caches it)
        writer.writerows({"epoch": int(h["epoch"]), "train_loss": h["train_loss"]} for h in result.history)
    trained_epochs = len(result.history) - result.resumed_from_epoch
    fitted = spec["family"] in FEATURE_FAMILIES  # one pass, no epochs: the fit's own figures instead
    metrics = {
        "family": spec["family"], "device": result.device, "epochs": 0 if fitted else config.train.epochs,
        # what bit-for-bit equality on the CPU also depends on (pipeline reproduce compares them)
        "threads": torch.get_num_threads(), "torch": torch.__version__, "processes": world,
        "resumed_from_epoch": result.resumed_from_epoch,
        "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
        "train_items": int(len(train_rows)), "train_anomalies": int(train_rows["is_anomaly"].sum()),
        "seconds": round(seconds, 3),
        # each epoch's batches (not its checkpoint); None for an epoch resumed from a checkpoint
        # written before 2026-12-02. A list: `dvc metrics show` leaves it out
        "epoch_seconds": [round(h["seconds"], 3) if "seconds" in h else None for h in result.history],
        "samples_per_second": round(len(train_rows) * max(trained_epochs, 1) / seconds, 1) if seconds > 0 else None,
    }
    if fitted:  # bank size, fit images and seconds, model bytes; and what the backbone was loaded with
        metrics.update(result.summary, backbone=spec["backbone"], layers=",".join(spec["layers"]),
                       pretrained=bool(result.spec["weights"]["pretrained"]),
                       weights_source=result.spec["weights"]["source"])
        print(f"train: {spec['family']} on {result.device} ({spec['backbone']}, weights "
              f"{metrics['weights_source']}), fitted on {metrics['fit_images']} normal {layout.unit} in "
              f"{seconds:.1f}s; memory bank {metrics['bank_size']} x {metrics['feature_dim']}, model "
              f"{metrics['state_bytes'] / 1e6:.1f} MB")
    else:
        print(f"train: {spec['family']} on {result.device}"
              f"{f' x {world} processes' if world > 1 else ''}, {len(train_rows)} {layout.unit} x "
              f"{config.train.epochs} epochs in {seconds:.1f}s, final loss {metrics['final_train_loss']:.5f}")
    write_json(layout.train_metrics, metrics)
    return metrics
