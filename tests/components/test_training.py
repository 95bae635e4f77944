"""Training: deterministic on the CPU, resumable to the same weights, loud on a NaN loss,
and each family ranks defects above normal surfaces (behaviour, not just shapes)."""
import numpy as np
import pytest
import torch

from components.images import discover
from detector.decode import decode_to_array
from components.metrics import evaluate
from detector.networks import DeepSAD
from components.training import TrainingDivergedError, TrainSettings, load_latest_checkpoint, train
from detector.scoring import score

SETTINGS = TrainSettings(epochs=4, batch_size=32, learning_rate=0.003, seed=5, device="cpu", num_threads=1)


def _spec(family):
    return {"family": family, "channels": 3, "image_size": 32, "width": 8, "latent_dim": 16, "eta": 1.0}


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    from components.synthetic import BatchSpec, write_batch

    landing = tmp_path_factory.mktemp("train-data")
    write_batch(landing, "b", seed=11, spec=BatchSpec(n_good=120, n_per_defect=15, size=64))
    files = discover(landing)
    images = np.stack([decode_to_array(f.path.read_bytes(), 32, 3) for f in files])
    labels = np.array([float(f.is_anomaly) for f in files], dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(files))
    return images[order], labels[order]


def _state(result):
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def test_same_seed_and_data_give_identical_weights_and_scores(arrays):
    images, labels = arrays
    first = train(_spec("deep_sad"), images, labels, SETTINGS, progress=False)
    second = train(_spec("deep_sad"), images, labels, SETTINGS, progress=False)
    for key, value in _state(first).items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert np.array_equal(score(first.model, images), score(second.model, images))


def test_resuming_from_a_checkpoint_reaches_the_uninterrupted_weights(arrays, tmp_path):
    images, labels = arrays
    straight = train(_spec("autoencoder"), images, labels, SETTINGS, progress=False)
    interrupted = TrainSettings(**{**SETTINGS.__dict__, "epochs": 2})
    train(_spec("autoencoder"), images, labels, interrupted, checkpoint_dir=tmp_path, fingerprint="run", progress=False)
    resumed = train(_spec("autoencoder"), images, labels, SETTINGS, checkpoint_dir=tmp_path, fingerprint="run",
                    progress=False)
    assert resumed.resumed_from_epoch == 2
    for key, value in _state(straight).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_checkpoints_are_written_at_most_every_checkpoint_every_s_and_after_the_last_epoch(arrays, tmp_path,
                                                                                           monkeypatch):
    """A clock that moves 30 s per epoch and a 50 s interval: epoch 3 is the first to end 50 s
    after the start, epoch 4 only 30 s after epoch 3's checkpoint, and epoch 5 is the last."""
    from types import SimpleNamespace

    import components.training as training

    images, labels = arrays
    now = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(monotonic=lambda: now[0]))
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 5, "checkpoint_every_s": 50.0})
    written = []

    def epoch_ended(epoch, _record):
        written.append(sorted(p.name for p in tmp_path.glob("epoch-*.pt")))
        now[0] += 30.0

    train(_spec("deep_sad"), images[:64], labels[:64], settings, checkpoint_dir=tmp_path, fingerprint="f",
          on_epoch=epoch_ended, progress=False)
    assert written == [[], [], ["epoch-0003.pt"], ["epoch-0003.pt"], ["epoch-0003.pt", "epoch-0005.pt"]]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(arrays, tmp_path):
    images, labels = arrays
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 2})
    train(_spec("deep_sad"), images, labels, settings, checkpoint_dir=tmp_path, fingerprint="f", progress=False)
    newest = tmp_path / "epoch-0002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert load_latest_checkpoint(tmp_path, "f")["epoch"] == 1
    assert load_latest_checkpoint(tmp_path, "another-run") is None


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    (tmp_path / "epoch-0001.pt").write_bytes(pickle.dumps({"fingerprint": "f", "epoch": 1, "x": Evil()}))
    assert load_latest_checkpoint(tmp_path, "f") is None


def test_nan_loss_stops_training_with_a_clear_error(arrays, monkeypatch):
    images, labels = arrays
    monkeypatch.setattr(DeepSAD, "loss", lambda self, x, y: self.distance(x).mean() * float("nan"))
    with pytest.raises(TrainingDivergedError, match="the loss diverged: it became nan at epoch 1, batch 1"):
        train(_spec("deep_sad"), images, labels, SETTINGS, progress=False)


def test_classifier_without_anomalies_is_refused(arrays):
    images, labels = arrays
    with pytest.raises(ValueError, match="needs labelled anomalies"):
        train(_spec("classifier"), images, np.zeros_like(labels), SETTINGS, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["autoencoder", "deep_sad", "classifier"])
def test_each_family_ranks_defects_above_good_surfaces(arrays, family):
    images, labels = arrays
    cut = int(len(images) * 0.7)
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 10})
    result = train(_spec(family), images[:cut], labels[:cut], settings, progress=False)
    held_out = evaluate(score(result.model, images[cut:]), labels[cut:], np.inf)
    assert held_out["auroc"] >= 0.8, (family, held_out["auroc"])


def test_deep_sad_without_anomalies_is_deep_svdd(arrays):
    images, labels = arrays
    normal = images[labels == 0]
    result = train(_spec("deep_sad"), normal, np.zeros(len(normal), np.float32), SETTINGS, progress=False)
    assert bool(result.model.center_set) and np.isfinite(score(result.model, normal)).all()


def test_a_partial_checkpoint_left_by_a_killed_save_is_removed_and_never_loaded(arrays, tmp_path):
    images, labels = arrays
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 2})
    train(_spec("deep_sad"), images, labels, settings, checkpoint_dir=tmp_path, fingerprint="f", progress=False)
    (tmp_path / "epoch-0003.pt.tmp").write_bytes((tmp_path / "epoch-0002.pt").read_bytes()[:100])
    resumed = train(_spec("deep_sad"), images, labels, SETTINGS, checkpoint_dir=tmp_path, fingerprint="f",
                    progress=False)
    assert resumed.resumed_from_epoch == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_an_interrupted_checkpoint_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    from components import training

    def interrupted(obj, handle):
        handle.write(b"half")
        raise KeyboardInterrupt  # what a SIGINT, or SIGTERM turned into an exception, does mid-save

    monkeypatch.setattr(training.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training._atomic_save({"epoch": 1}, tmp_path / "epoch-0001.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_autoencoder_skips_a_batch_without_normal_images(arrays):
    """Its loss is over normal images only: a batch of anomalies alone (an epoch's last, for
    example) has nothing to learn from, and once crashed the run (no graph to step on)."""
    images, labels = arrays
    normal, anomalous = np.flatnonzero(labels < 0.5)[:2], np.flatnonzero(labels >= 0.5)[:30]
    order = np.concatenate([normal, anomalous])  # 16 batches of 2, at most 2 of them with a normal image
    settings = TrainSettings(**{**SETTINGS.__dict__, "batch_size": 2, "epochs": 2})
    result = train(_spec("autoencoder"), images[order], labels[order], settings, progress=False)
    assert len(result.history) == 2 and all(np.isfinite(h["train_loss"]) for h in result.history)
    assert all(h["seconds"] > 0 for h in result.history)


CHURN_AFTER_TRAINING = """
import resource, sys
import numpy as np, torch
from components.training import TrainSettings, train

images = np.random.default_rng(0).integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
train({"family": "deep_sad", "channels": 3, "image_size": 16, "width": 4, "latent_dim": 8, "eta": 1.0},
      images, np.zeros(16, np.float32), TrainSettings(epochs=1, batch_size=8, learning_rate=0.001, device="cpu"))

def batch():  # three 20 MB blocks alive at once, then all freed: a batch's tensors in miniature
    blocks = [torch.ones(5 << 20) for _ in range(3)]
    del blocks

batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(int(sys.argv[1])):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_after_train_freed_memory_is_reused_not_faulted_in_again_every_batch():
    """train() fixes glibc's thresholds (components.training.keep_freed_memory): freed blocks
    stay in the heap for the next batch. Under glibc's moving defaults the same 50 batches
    took 35,000 to 515,000 minor page faults here, most runs about 10,000 per batch."""
    import subprocess
    import sys

    batches, pages_per_batch = 50, 3 * (20 << 20) // 4096
    done = subprocess.run([sys.executable, "-c", CHURN_AFTER_TRAINING, str(batches)],
                          capture_output=True, text=True, check=True)
    faults = int(done.stdout.split()[-1])
    # handing the blocks back after each batch would fault in every page each time
    assert faults < 4 * pages_per_batch, f"{faults} minor faults in {batches} batches of {pages_per_batch} pages"
