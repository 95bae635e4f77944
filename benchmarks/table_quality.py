"""7b. Table detection quality: AUROC and average precision of each detector family on encoded
table rows (data.kind table), beside scikit-learn's IsolationForest and LocalOutlierFactor run
on the same splits and the same encoded features.

Two data sets:

* ``default``: what ``make run`` trains on with ``data.kind: table``. The one batch that
  ``pipeline generate-data`` writes (``batch-0001``, seed ``base.seed`` + 1, 5,000 rows, 4 %
  fraud; through CSV as the pipeline reads it), split by the pipeline's own rule
  (``components.images.split_of`` of ``components.tables.key_hash`` of each row's key, with
  ``preprocess.split``) and encoded by ``detector.transform.Transform`` with params.yaml's
  ``table.columns``, fitted on the training rows. The training split keeps its labelled
  anomalies, as in the pipeline.
* ``breast_cancer``: scikit-learn's bundled Wisconsin breast-cancer data, malignant rows as
  the anomaly class, made an anomaly-detection problem the way benchmarks/quality.py makes
  the digits one (the protocol is in NOTES below).

The families are trained by ``components.training.train`` with params.yaml's model and
train settings and scored by ``detector.scoring.score``; nothing here re-implements them.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.common import ROOT, Context, Figure
from benchmarks.quality import FAMILIES, IFOREST_TREES, LABELLED_FRACTION, METRICS

TITLE = "7b. Table detection quality: each family vs IsolationForest and LocalOutlierFactor on the same splits"

BASELINES = ("isolation_forest", "local_outlier_factor")
METHODS = FAMILIES + BASELINES
DATASETS = {"default": "default table", "breast_cancer": "breast cancer"}

DEFAULT_ROWS = 5000             # pipeline generate-data's --rows default
DEFAULT_FRAUD_RATE = 0.04       # and its --fraud-rate
DEFAULT_BATCH = "batch-0001"    # the first batch: seed base.seed + 1
CANCER_SPLIT = (0.6, 0.2, 0.2)  # train / calibration / test, stratified
LOF_NEIGHBOURS = 20             # scikit-learn's default
# a few thousand rows of 19 features through a 2-layer MLP: a second intra-op thread only
# adds synchronisation (measured here: 1 thread took about 0.75 x the time of 2)
THREADS = 1

PROTOCOL = f"""\
**Protocol.** Families: `components.training.train` + `score` with the table spec
(`input: table`, MLPs) and params.yaml's model (width, latent_dim) and train settings (epochs,
batch size, learning rate, weight decay, eta): the settings `make run` would use for a table,
the same on both data sets, with one torch thread (speed only). The autoencoder trains on the
normal training rows only (train() skips anomalies for it); Deep SAD and the classifier also
see the labelled anomalies of the training split. Every method sees the same features: the
rows encoded by `detector.transform.Transform` fitted on the training rows (numeric columns
median-imputed and standardised, categorical ones one-hot). Baselines: IsolationForest
({IFOREST_TREES} trees) and LocalOutlierFactor (`novelty=True`, {LOF_NEIGHBOURS} neighbours),
fitted on the **normal** training rows (the training split's labels used the one way an
unsupervised detector can: a clean normal set; this is the stronger choice for them, and what
LOF's novelty mode assumes), score = `-score_samples`. Metrics on the test split only:
`sklearn.metrics.roc_auc_score` and `average_precision_score`, anomalies positive. Nothing is
tuned: the calibration split is unused (the pipeline uses it for the threshold).

*Repetitions:* repetition r (r = 0, 1, ...) trains the families with seed `base.seed` + r and
seeds IsolationForest with it; on the breast-cancer data it also draws the split and the
labelled anomalies with seed r. The default table is the same in every repetition (the one
batch `make run` makes). LocalOutlierFactor has no seed: on the default table its samples are
equal. Each figure's samples are the repetitions' values (median and min–max range). The best
family is the one with the highest median test AUROC over the repetitions; the *best beats
baselines* figures are, per repetition, its value minus the better of the two baselines' in
that repetition, and the target is met when their median is above zero.

*Default table:* the training split keeps all its anomalies (about 4 % of it), exactly as the
pipeline trains. 8 columns encode to 19 features.

*Breast cancer:* `sklearn.datasets.load_breast_cancer()` (569 rows, 212 malignant = anomaly,
357 benign = normal; 30 numeric features, all standardised). The rows are split stratified by
class, {CANCER_SPLIT[0]:.0%} train / {CANCER_SPLIT[1]:.0%} calibration / {CANCER_SPLIT[2]:.0%} test
(`benchmarks.quality.digits_partition`); the training rows are the benign train rows plus
malignant train rows drawn at random, as many as make {LABELLED_FRACTION:.0%} of the training
rows (about 24 against 214 benign: the digits' labelled fraction, Deep SAD's gamma_l setting);
the other malignant train rows are left out. The test split keeps its natural ratio (72 benign
and 42 malignant in every repetition, so AP's chance level is about 0.37).
"""

NOTES = PROTOCOL


@dataclass
class TableSplit:
    """Encoded float32 rows and 0/1 anomaly labels of the training and test splits."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    info: str = ""


# ---------------------------------------------------------------- data sets

def default_frame(config, rows: int = DEFAULT_ROWS):
    """`pipeline generate-data`'s first batch for data.kind table, read back from its CSV."""
    import io

    import pandas as pd

    from components.tables import generate_transactions

    frame = generate_transactions(rows, config.base.seed + 1, DEFAULT_BATCH, fraud_rate=DEFAULT_FRAUD_RATE)
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    buffer.seek(0)
    return pd.read_csv(buffer)


def default_splits(config, frame) -> dict[str, object]:
    """The frame's rows of each split by the pipeline's rule, each sorted by key (as preprocess)."""
    from components.splits import split_of
    from components.tables import key_hash

    s = config.preprocess.split
    key = config.table.key_column
    split = frame[key].map(lambda k: split_of(key_hash(k), (s.train, s.calibration, s.test)))
    return {name: frame[split == name].sort_values(key, key=lambda keys: keys.astype(str))
            for name in ("train", "calibration", "test")}


def default_split(config, rows: int = DEFAULT_ROWS) -> TableSplit:
    from detector.transform import Transform

    parts = default_splits(config, default_frame(config, rows))
    rules = {name: rule.model_dump() for name, rule in config.table.columns.items()}
    transform = Transform.fit(parts["train"], rules)
    label = config.table.label_column
    info = ", ".join(f"{k} {len(v)} rows ({int(v[label].sum())} anomalies)" for k, v in parts.items())
    return TableSplit(transform.apply(parts["train"]), parts["train"][label].to_numpy(np.float32),
                      transform.apply(parts["test"]), parts["test"][label].to_numpy(np.float32),
                      info=f"{info}; {transform.width} features")


def cancer_data():
    """The breast-cancer frame (30 numeric feature columns) and 0/1 anomaly labels (malignant = 1)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    anomaly = (data.target.to_numpy() == 0).astype(np.int64)  # target 0 = malignant
    return data.data, anomaly


def cancer_rows(anomaly: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Row indices of the training rows (benign + the labelled malignant share) and the test split."""
    from benchmarks.quality import digits_partition, digits_training_rows

    parts = digits_partition(anomaly, seed=seed, fractions=CANCER_SPLIT)  # stratified by class
    # "normal digit" 0: the benign rows, and labelled anomalies drawn from the malignant ones
    train = digits_training_rows(anomaly, parts["train"], 0, labelled_fraction=LABELLED_FRACTION, seed=seed)
    return {"train": train, "test": parts["test"]}


def cancer_split(seed: int) -> TableSplit:
    from detector.transform import Transform

    features, anomaly = cancer_data()
    rows = cancer_rows(anomaly, seed)
    train, test = features.iloc[rows["train"]], features.iloc[rows["test"]]
    transform = Transform.fit(train, {name: {"type": "numeric"} for name in features.columns})
    y_train, y_test = anomaly[rows["train"]], anomaly[rows["test"]]
    info = (f"train {len(train)} rows ({int(y_train.sum())} labelled malignant), test {len(test)} rows "
            f"({int(y_test.sum())} malignant); {transform.width} features")
    return TableSplit(transform.apply(train), y_train.astype(np.float32), transform.apply(test),
                      y_test.astype(np.float32), info=info)


# ---------------------------------------------------------------- methods

def family_scores(family: str, split: TableSplit, config, epochs: int, seed: int) -> np.ndarray:
    from components.training import TrainSettings, train
    from detector.scoring import score

    spec = {"family": family, "input": "table", "features": int(split.train_x.shape[1]),
            "width": config.model.width, "latent_dim": config.model.latent_dim, "eta": config.train.eta}
    settings = TrainSettings(epochs=epochs, batch_size=config.train.batch_size,
                             learning_rate=config.train.learning_rate, weight_decay=config.train.weight_decay,
                             seed=seed, device=config.train.device, num_threads=THREADS)
    result = train(spec, split.train_x, split.train_y, settings, progress=False)
    return score(result.model, split.test_x)


def baseline_scores(split: TableSplit, seed: int, normal_only: bool = True) -> dict[str, np.ndarray]:
    """IsolationForest and LocalOutlierFactor fitted on the normal training rows (or all of
    them); higher = more anomalous."""
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor

    fit = split.train_x[split.train_y < 0.5] if normal_only else split.train_x
    fit, test = fit.astype(np.float64), split.test_x.astype(np.float64)
    forest = IsolationForest(n_estimators=IFOREST_TREES, random_state=seed).fit(fit)
    lof = LocalOutlierFactor(n_neighbors=LOF_NEIGHBOURS, novelty=True).fit(fit)
    return {"isolation_forest": -forest.score_samples(test), "local_outlier_factor": -lof.score_samples(test)}


def metrics(test_y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = {}
    for method, values in scores.items():
        if not np.isfinite(values).all():
            raise RuntimeError(f"{method} gave NaN or infinite scores")
        out[method] = {"auroc": float(roc_auc_score(test_y, values)),
                       "average_precision": float(average_precision_score(test_y, values))}
    return out


def evaluate(split: TableSplit, config, epochs: int, seed: int, log=None) -> tuple[dict, dict]:
    """Every method on one split: {method: {auroc, average_precision}}; and the baselines
    fitted on all training rows instead (a side fact, not a figure)."""
    scores = {family: family_scores(family, split, config, epochs, seed) for family in FAMILIES}
    scores.update(baseline_scores(split, seed))
    results = metrics(split.test_y, scores)
    all_rows = metrics(split.test_y, baseline_scores(split, seed, normal_only=False))
    if log:
        log("    " + "  ".join(f"{m} {r['auroc']:.3f}/{r['average_precision']:.3f}" for m, r in results.items())
            + "  (AUROC/AP)")
    return results, all_rows


# ---------------------------------------------------------------- figures

def _median(runs: list[dict], method: str, metric: str) -> float:
    return statistics.median(r[method][metric] for r in runs)


def _figures(dataset: str, runs: list[dict]) -> list[Figure]:
    label = DATASETS[dataset]
    figures = [Figure(f"table_quality.{dataset}.{method}.{metric}", f"{label}: {method} {name}", name,
                      [r[method][metric] for r in runs], higher_is_better=True)
               for method in METHODS for metric, name in METRICS.items()]
    best = max(FAMILIES, key=lambda f: _median(runs, f, "auroc"))
    for metric, name in METRICS.items():
        margins = [r[best][metric] - max(r[b][metric] for b in BASELINES) for r in runs]
        wins = sum(m > 0 for m in margins)
        margin = statistics.median(margins)
        key = f"table_quality.{dataset}.best_beats_baselines" + ("" if metric == "auroc" else "_ap")
        versus = " / ".join(f"{b} {_median(runs, b, metric):.3f}" for b in BASELINES)
        figures.append(Figure(key, f"{label}: best family's {name} minus the better baseline's", name, margins,
                              target="> 0", met=margin > 0, higher_is_better=True,
                              note=f"{best} {_median(runs, best, metric):.3f} vs {versus}; "
                                   f"ahead in {wins} of {len(runs)}"))
    return figures


def _median_table(results: dict[str, list[dict]], side: dict[str, list[dict]]) -> str:
    lines = ["", "**Medians over the repetitions, test split (AUROC / AP)**", "",
             "| data | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for dataset, runs in results.items():
        cells = [f"{_median(runs, m, 'auroc'):.3f} / {_median(runs, m, 'average_precision'):.3f}" for m in METHODS]
        lines.append(f"| {DATASETS[dataset]} | " + " | ".join(cells) + " |")
    lines += ["", "Baselines fitted on *every* training row instead (labelled anomalies included, as "
              "benchmarks/quality.py fits its IsolationForest), for comparison; not a figure:"]
    for dataset, runs in side.items():
        lines.append(f"{DATASETS[dataset]}: " + ", ".join(
            f"{b} {_median(runs, b, 'auroc'):.3f} / {_median(runs, b, 'average_precision'):.3f}" for b in BASELINES)
            + ".")
    return "\n".join(lines)


def run(ctx: Context) -> list[Figure]:
    global NOTES
    import torch

    from pipeline.config import load

    config = load(ROOT / "params.yaml")
    epochs = 2 if ctx.quick else config.train.epochs
    repeats = max(1, ctx.repeats)
    seeds = [config.base.seed + r for r in range(repeats)]
    results: dict[str, list[dict]] = {name: [] for name in DATASETS}
    side: dict[str, list[dict]] = {name: [] for name in DATASETS}
    facts: dict[str, str] = {}
    seconds: dict[str, float] = {}
    threads = torch.get_num_threads()
    try:
        started = time.perf_counter()
        default = default_split(config, 1000 if ctx.quick else DEFAULT_ROWS)
        facts["default"] = f"seed {config.base.seed + 1}, {default.info}"
        ctx.log(f"  default table: {facts['default']}")
        for seed in seeds:
            ctx.log(f"  default table, training seed {seed}")
            measured, baselines_all = evaluate(default, config, epochs, seed, ctx.log)
            results["default"].append(measured)
            side["default"].append(baselines_all)
        seconds["default"] = time.perf_counter() - started

        started = time.perf_counter()
        for r, seed in enumerate(seeds):
            split = cancer_split(r)
            ctx.log(f"  breast cancer, split seed {r}, training seed {seed}: {split.info}")
            facts.setdefault("breast_cancer", split.info)
            measured, baselines_all = evaluate(split, config, epochs, seed, ctx.log)
            results["breast_cancer"].append(measured)
            side["breast_cancer"].append(baselines_all)
        seconds["breast_cancer"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)  # the benchmarks after this one run in the same process

    figures: list[Figure] = []
    for dataset, runs in results.items():
        figures += _figures(dataset, runs)
    notes = [PROTOCOL,
             f"\n*This run:* {repeats} repetition(s), training seeds {seeds[0]}..{seeds[-1]}, {epochs} epochs. "
             f"Default table: {facts['default']}; {seconds['default']:.0f} s. Breast cancer (split seed 0): "
             f"{facts['breast_cancer']}; {seconds['breast_cancer']:.0f} s.",
             _median_table(results, side)]
    NOTES = "\n".join(notes)
    return figures
