"""7. Detection quality: AUROC and average precision of each detector family, beside
scikit-learn's IsolationForest and a PCA reconstruction baseline run on the same splits.

Two data sets:

* ``default``: what ``make run`` trains on. One batch of ``components.synthetic`` with the
  default ``BatchSpec()`` and the seed rule of ``pipeline generate-data`` (``base.seed`` +
  batch number 1), decoded by ``detector.decode.decode_to_array`` at params.yaml's
  ``preprocess.image_size``/``channels``, and split by the pipeline's own rule
  (``components.images.split_of`` of each file's content hash with ``preprocess.split``).
  The training split keeps its labelled anomalies, as in the pipeline.
* ``digits``: scikit-learn's bundled 8x8 digits, one digit normal and the nine others
  anomalies, for each of the ten digits (the protocol is in NOTES below).

The families are trained by ``components.training.train`` with params.yaml's model and
train settings and scored by ``detector.scoring.score``; nothing here re-implements them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, Context, Figure

TITLE = "7. Detection quality: each family vs IsolationForest and PCA on the same splits"

FAMILIES = ("autoencoder", "deep_sad", "classifier")
BASELINES = ("isolation_forest", "pca")
METHODS = FAMILIES + BASELINES
METRICS = {"auroc": "AUROC", "average_precision": "AP"}

# digits protocol (stated in NOTES)
DIGITS_SEED = 0                 # the stratified train/calibration/test split and the labelled-anomaly draw
LABELLED_FRACTION = 0.10        # labelled anomalies as a share of the digits training rows (Deep SAD's gamma_l)
PCA_VARIANCE = 0.95             # PCA keeps the fewest components that explain this share of the variance
IFOREST_TREES = 200
# 8x8 images with about 120 training rows: a second intra-op thread only adds synchronisation
# (measured on the 2-core machine under load: 1 thread took a seventh of the CPU time of 2)
DIGITS_THREADS = 1

PROTOCOL = f"""\
**Protocol.** Families: `components.training.train` + `score` with params.yaml's model
(width, latent_dim, eta) and train settings (epochs, batch size, learning rate, weight decay,
`base.seed`); the same settings on both data sets, except one torch thread for the tiny
digits (speed only) (8x8 digits go in at 8x8: the networks'
three stride-2 blocks reach 1x1, which they support). The autoencoder trains on the normal
training rows only (train() skips anomalies for it); Deep SAD and the classifier also see the
labelled anomalies of the training split. Baselines on the same splits, on flattened pixels
scaled to [0, 1]: IsolationForest ({IFOREST_TREES} trees, seeded with `base.seed`) fitted on
every training row the families see; PCA fitted on the normal training rows, with the fewest
components explaining {PCA_VARIANCE:.0%} of their variance, score = mean squared
reconstruction error. Metrics on the test split only: `sklearn.metrics.roc_auc_score` and
`average_precision_score`, anomalies positive. Nothing is tuned: the calibration split is
unused here (the pipeline uses it for the threshold, which AUROC/AP do not need).

*Default data:* the training split keeps all its anomalies (about a quarter of it), exactly
as the pipeline trains.

*Digits:* the 1,797 images (0..16 scaled to uint8 0..255, one channel) are split once,
stratified by digit and seeded ({DIGITS_SEED}), 60 % train / 20 % calibration / 20 % test
(`sklearn.model_selection.train_test_split` twice). For normal digit d the training rows are
the digit-d rows of the train split plus labelled anomalies drawn at random (seed
{DIGITS_SEED} + d) from the other digits' train rows, as many as make {LABELLED_FRACTION:.0%}
of the training rows (about 12 against about 107 normal rows, Deep SAD's gamma_l setting);
the other train-split anomalies are left out. The test split is every test row: about 36
normal and 324 anomalies, so AP's chance level is about 0.9 there and AUROC is the figure
to read. The digits figures' samples are the ten per-digit values (range = worst and best
digit); the *best beats baselines* margins compare the means over the ten digits. The best
family is the one with the highest mean test AUROC.
"""

NOTES = PROTOCOL


@dataclass
class Split:
    """One experiment: uint8 images (N x C x S x S), 0/1 anomaly labels, for each split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# ---------------------------------------------------------------- data sets

def default_split(ctx_quick: bool, config, folder: Path, seed: int) -> tuple[Split, dict]:
    """make run's data, decoded and split the pipeline's way."""
    from components.images import content_hash, discover
    from components.splits import split_of
    from detector.decode import decode_to_array
    from components.synthetic import BatchSpec, write_batch

    spec = BatchSpec(n_good=60, n_per_defect=8, size=64) if ctx_quick else BatchSpec()
    landing = folder / f"landing-{seed}"
    write_batch(landing, "batch-0001", seed=seed, spec=spec)
    fractions = (config.preprocess.split.train, config.preprocess.split.calibration, config.preprocess.split.test)
    rows = {"train": ([], []), "calibration": ([], []), "test": ([], [])}
    for file in sorted(discover(landing, config.data.extensions), key=lambda f: f.relpath):
        data = file.path.read_bytes()
        images, labels = rows[split_of(content_hash(data), fractions)]
        images.append(decode_to_array(data, config.preprocess.image_size, config.preprocess.channels))
        labels.append(float(file.is_anomaly))
    split = Split(np.stack(rows["train"][0]), np.asarray(rows["train"][1], np.float32),
                  np.stack(rows["test"][0]), np.asarray(rows["test"][1], np.float32))
    info = {name: (len(lab), int(sum(lab))) for name, (_, lab) in rows.items()}
    return split, info


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as uint8 N x 1 x 8 x 8 (0..16 -> 0..255) and their digit labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None, :, :]
    return images, digits.target.astype(np.int64)


def digits_partition(targets: np.ndarray, seed: int = DIGITS_SEED,
                     fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    """Row indices of the train, calibration and test splits: stratified by digit, seeded."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(targets))
    rest, test = train_test_split(rows, test_size=fractions[2], stratify=targets, random_state=seed)
    train, calibration = train_test_split(rest, test_size=fractions[1] / (fractions[0] + fractions[1]),
                                          stratify=targets[rest], random_state=seed)
    return {"train": np.sort(train), "calibration": np.sort(calibration), "test": np.sort(test)}


def digits_training_rows(targets: np.ndarray, train_rows: np.ndarray, normal_digit: int,
                         labelled_fraction: float = LABELLED_FRACTION, seed: int = DIGITS_SEED) -> np.ndarray:
    """The normal digit's train rows plus labelled anomalies making ``labelled_fraction`` of the result."""
    normal = train_rows[targets[train_rows] == normal_digit]
    anomalies = train_rows[targets[train_rows] != normal_digit]
    count = int(round(labelled_fraction / (1.0 - labelled_fraction) * len(normal)))
    rng = np.random.default_rng([seed, normal_digit])
    labelled = rng.choice(anomalies, size=min(count, len(anomalies)), replace=False)
    return np.sort(np.concatenate([normal, labelled]))


def digits_split(images: np.ndarray, targets: np.ndarray, parts: dict[str, np.ndarray], normal_digit: int) -> Split:
    train = digits_training_rows(targets, parts["train"], normal_digit)
    test = parts["test"]
    return Split(images[train], (targets[train] != normal_digit).astype(np.float32),
                 images[test], (targets[test] != normal_digit).astype(np.float32))


# ---------------------------------------------------------------- methods

def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def isolation_forest_scores(split: Split, seed: int) -> np.ndarray:
    """Fitted on every training row the families see; higher = more anomalous."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(n_estimators=IFOREST_TREES, random_state=seed).fit(_flat(split.train_x))
    return -forest.score_samples(_flat(split.test_x))


def pca_scores(split: Split, variance: float = PCA_VARIANCE) -> tuple[np.ndarray, int]:
    """Reconstruction MSE of a PCA fitted on the normal training rows; and its component count."""
    from sklearn.decomposition import PCA

    normal = _flat(split.train_x[split.train_y < 0.5])
    pca = PCA(n_components=variance, svd_solver="full").fit(normal)
    test = _flat(split.test_x)
    error = ((pca.inverse_transform(pca.transform(test)) - test) ** 2).mean(axis=1)
    return error, int(pca.n_components_)


def family_scores(family: str, split: Split, config, epochs: int, num_threads: int | None = None) -> np.ndarray:
    from components.training import TrainSettings, train
    from detector.scoring import score

    spec = {"family": family, "channels": int(split.train_x.shape[1]), "image_size": int(split.train_x.shape[2]),
            "width": config.model.width, "latent_dim": config.model.latent_dim, "eta": config.train.eta}
    settings = TrainSettings(epochs=epochs, batch_size=config.train.batch_size,
                             learning_rate=config.train.learning_rate, weight_decay=config.train.weight_decay,
                             seed=config.base.seed, device=config.train.device,
                             num_threads=config.train.num_threads if num_threads is None else num_threads)
    result = train(spec, split.train_x, split.train_y, settings, progress=False)
    return score(result.model, split.test_x)


def evaluate(split: Split, config, epochs: int, log=None,
             num_threads: int | None = None) -> tuple[dict[str, dict[str, float]], dict]:
    """Every method on one split: {method: {auroc, average_precision}}, and side facts."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores: dict[str, np.ndarray] = {}
    facts: dict = {}
    for family in FAMILIES:
        started = time.perf_counter()
        scores[family] = family_scores(family, split, config, epochs, num_threads)
        facts[f"{family}_seconds"] = time.perf_counter() - started
    scores["isolation_forest"] = isolation_forest_scores(split, config.base.seed)
    scores["pca"], facts["pca_components"] = pca_scores(split)
    results = {}
    for method, values in scores.items():
        if not np.isfinite(values).all():
            raise RuntimeError(f"{method} gave NaN or infinite scores")
        results[method] = {"auroc": float(roc_auc_score(split.test_y, values)),
                           "average_precision": float(average_precision_score(split.test_y, values))}
    if log:
        log("    " + "  ".join(f"{m} {r['auroc']:.3f}/{r['average_precision']:.3f}" for m, r in results.items())
            + "  (AUROC/AP)")
    return results, facts


# ---------------------------------------------------------------- figures

def _margin_figures(dataset: str, label: str, means: dict[str, dict[str, float]]) -> list[Figure]:
    """The best family (by mean AUROC) against the better of the two baselines, per metric."""
    best = max(FAMILIES, key=lambda f: means[f]["auroc"])
    figures = []
    for metric, name in METRICS.items():
        strongest = max(BASELINES, key=lambda b: means[b][metric])
        margin = means[best][metric] - means[strongest][metric]
        key = f"quality.{dataset}.best_beats_baselines" + ("" if metric == "auroc" else "_ap")
        figures.append(Figure(key, f"{label}: best family's {name} minus the better baseline's", name,
                              [margin], target="> 0", met=margin > 0, higher_is_better=True,
                              note=f"{best} {means[best][metric]:.3f} vs {strongest} {means[strongest][metric]:.3f}"))
    return figures


def _per_digit_table(per_digit: list[dict[str, dict[str, float]]], digits: list[int]) -> str:
    lines = []
    for metric, name in METRICS.items():
        lines += ["", f"**Digits, {name} on the test split per normal digit**", "",
                  "| normal digit | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
        for digit, results in zip(digits, per_digit):
            shown = [f"{results[m][metric]:.3f}" for m in METHODS]
            best = f"{max(results[m][metric] for m in METHODS):.3f}"
            cells = [f"**{text}**" if text == best else text for text in shown]  # ties as printed
            lines.append(f"| {digit} | " + " | ".join(cells) + " |")
        means = [statistics.fmean(r[m][metric] for r in per_digit) for m in METHODS]
        lines.append("| mean | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    return "\n".join(lines)


def run(ctx: Context) -> list[Figure]:
    global NOTES
    from pipeline.config import load

    from benchmarks.common import SCRATCH_DEFAULTS
    from tests.scratch import deep_update
    from pipeline.config import parse

    config = load(ROOT / "params.yaml")
    config = parse(deep_update(config.model_dump(mode="json", by_alias=True), SCRATCH_DEFAULTS))
    epochs = 2 if ctx.quick else config.train.epochs
    figures: list[Figure] = []
    notes = [PROTOCOL]

    # default data: one seed (the seed make run uses for its first batch)
    seed = config.base.seed + 1
    started = time.perf_counter()
    split, counts = default_split(ctx.quick, config, ctx.folder("default"), seed)
    ctx.log(f"  default data (seed {seed}): " + ", ".join(f"{k} {n} ({a} anomalies)" for k, (n, a) in counts.items())
            + f"; decoded in {time.perf_counter() - started:.0f} s")
    default, facts = evaluate(split, config, epochs, ctx.log)
    for method in METHODS:
        for metric, name in METRICS.items():
            figures.append(Figure(f"quality.default.{method}.{metric}", f"default data: {method} {name}", name,
                                  [default[method][metric]], higher_is_better=True))
    figures += _margin_figures("default", "default data", default)
    notes.append(f"\n*Default data this run:* seed {seed}, {config.preprocess.image_size}x"
                 f"{config.preprocess.image_size}x{config.preprocess.channels}, " +
                 ", ".join(f"{k} {n} rows ({a} anomalies)" for k, (n, a) in counts.items()) +
                 f"; {epochs} epochs; PCA kept {facts['pca_components']} components; training seconds " +
                 ", ".join(f"{f} {facts[f + '_seconds']:.0f}" for f in FAMILIES) + ".")

    # digits: each digit normal in turn (two digits in quick mode)
    images, targets = digits_images()
    parts = digits_partition(targets)
    digits = [0, 1] if ctx.quick else list(range(10))
    per_digit = []
    started = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    try:
        for digit in digits:
            ctx.log(f"  digits: normal digit {digit}")
            results, _ = evaluate(digits_split(images, targets, parts, digit), config, epochs, ctx.log,
                                  num_threads=DIGITS_THREADS)
            per_digit.append(results)
    finally:
        torch.set_num_threads(threads)  # the benchmarks after this one run in the same process
    seconds = time.perf_counter() - started
    means = {m: {metric: statistics.fmean(r[m][metric] for r in per_digit) for metric in METRICS} for m in METHODS}
    for method in METHODS:
        for metric, name in METRICS.items():
            values = [r[method][metric] for r in per_digit]
            figures.append(Figure(f"quality.digits.{method}.{metric}", f"digits: {method} {name}", name, values,
                                  higher_is_better=True, note=f"mean {means[method][metric]:.3f}"))
    figures += _margin_figures("digits", "digits (mean of ten)" if not ctx.quick else "digits (mean)", means)
    notes.append(f"\n*Digits this run:* normal digits {digits}, {epochs} epochs, {seconds:.0f} s in all.")
    notes.append(_per_digit_table(per_digit, digits))
    NOTES = "\n".join(notes)
    return figures
