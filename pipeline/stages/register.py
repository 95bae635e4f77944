"""register (not a DVC stage: it has side effects): one MLflow run with everything
needed to understand and rebuild the model, a new registered version, and the
gates. It never moves the champion itself; ``promote`` does, from the gate report.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from detector.serving import score_frame
from pipeline.gating import compare, metrics_of
from pipeline.io import DataError, read_json, write_json
from pipeline.kinds import kind_of
from pipeline.layout import Layout

CODE_DIR = Path(__file__).resolve().parents[2] / "detector"  # the model package: shipped, and hashed
FINGERPRINT_TAG = "model_fingerprint"


def _log_run_record(layout: Layout, client, run_id: str, metrics: dict, calibration: dict, patch: bytes) -> None:
    import mlflow

    from pipeline import tracking

    config = layout.config
    flat = config.flat()
    for start in range(0, len(flat), 90):
        mlflow.log_params({k: str(v)[:500] for k, v in list(flat.items())[start:start + 90]})
    numeric = {f"test_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    numeric.update({f"calibration_{k}": float(v) for k, v in calibration.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None})
    train = read_json(layout.train_metrics) if layout.train_metrics.is_file() else {}
    numeric.update({f"train_{k}": float(v) for k, v in train.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None})
    if layout.validation_summary.is_file():
        summary = read_json(layout.validation_summary)
        numeric["validation_files"] = float(summary["n_files"])
        numeric.update({f"validation_count_{k}": float(v) for k, v in summary["label_counts"].items()})
    mlflow.log_metrics(numeric)
    if not client.get_metric_history(run_id, "train_loss") and layout.train_history.is_file():
        from mlflow.entities import Metric

        history = pd.read_csv(layout.train_history)
        durations = dict(enumerate(train.get("epoch_seconds") or [], start=1))  # epoch -> seconds or None
        now = int(time.time() * 1000)
        per_epoch = [Metric("train_loss", float(row.train_loss), now, int(row.epoch)) for row in history.itertuples()]
        per_epoch += [Metric("epoch_seconds", float(seconds), now, epoch) for epoch, seconds in durations.items()
                      if seconds is not None]
        client.log_batch(run_id, metrics=per_epoch)  # MLflow splits it into requests of 1,000
    for path, folder in ((layout.plots, "plots"), (layout.validation_dir, "validation")):
        if path.is_dir():
            mlflow.log_artifacts(str(path), folder)
    for path in (layout.metrics, layout.threshold, layout.train_metrics, layout.dvc_lock, layout.root / "params.yaml",
                 layout.roc_points, layout.train_history):
        if path.is_file():
            mlflow.log_artifact(str(path), "pipeline")
    if patch:  # the code was not exactly the commit: keep the difference, so reproduce can rebuild it
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "uncommitted.patch").write_bytes(patch)
            mlflow.log_artifact(str(Path(scratch) / "uncommitted.patch"), "pipeline")
    env = tracking.environment()
    mlflow.log_text(env.pop("packages"), "environment/requirements.txt")
    mlflow.log_dict(env, "environment/python.json")


def model_fingerprint(layout: Layout, origin: dict, spec: dict, calibration: dict, patch: bytes) -> str:
    """What makes two runs' models the same model: the data version, every setting, the
    code (commit and uncommitted patch, and the files the served model ships), the
    packages it pins, the weights, the served spec, the threshold and the calibration normals."""
    from pipeline import tracking

    digest = hashlib.sha256()
    for part in (origin["data_version"], origin["git_commit"], json.dumps(layout.config.flat(), sort_keys=True,
                 default=str), json.dumps(spec, sort_keys=True), repr(float(calibration["threshold"])),
                 "\n".join(tracking.model_requirements(spec["spec"]["family"]))):
        digest.update(part.encode() + b"\0")
    for path in sorted(CODE_DIR.rglob("*.py")):  # what log_detector ships, even outside git
        digest.update(path.relative_to(CODE_DIR).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(hashlib.sha256(patch).digest())
    digest.update(hashlib.sha256(layout.weights.read_bytes()).digest())
    if layout.calibration_normals.is_file():
        digest.update(hashlib.sha256(layout.calibration_normals.read_bytes()).digest())
    return digest.hexdigest()


def unchanged_version(client, name: str, fingerprint: str, run_id: str | None) -> tuple[str, dict] | None:
    """The version, with its tags, that this run would only register again, or None.

    A twin (same fingerprint) counts when it is the champion, or when it is the newest
    version, failed its gates, and was gated against today's champion: a night with
    unchanged data, code and params then registers nothing (DVC trained nothing). Any
    other twin, one that passed but was never promoted (promote failed) or was gated
    against another champion, is registered again and gated against today's champion.
    A version this same MLflow run made is no twin: that is a retried register, which
    reuses it. A registry that cannot search by tag makes this a normal registration.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.registry import CHAMPION, alias_version

    try:
        twins = {str(v.version): v for v in client.search_model_versions(
            f"name='{name}' and tags.{FINGERPRINT_TAG}='{fingerprint}'") if not run_id or v.run_id != run_id}
    except MlflowException as error:
        print(f"register: WARNING could not look for an identical version ({error.message[:200]}); registering")
        return None
    if not twins:
        return None
    champion = alias_version(client, name, CHAMPION)
    if champion in twins:
        return champion, dict(twins[champion].tags)
    newest = client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
    twin = twins.get(str(newest[0].version)) if newest else None
    if twin is not None and twin.tags.get("gate_status") == "failed" and \
            twin.tags.get("gated_against", "") == (champion or ""):
        return str(twin.version), dict(twin.tags)
    return None


def run(layout: Layout, run_id: str | None = None) -> dict:
    import mlflow

    from components import gates as gate_rules
    from pipeline.registry import (CHAMPION, alias_version, connect, ensure_experiment, log_detector, tag_version, wait_until_ready)
    from pipeline import tracking
    from pipeline.secrets import scrub_data

    config = layout.config
    store = tracking.store(layout)
    client = connect(store)
    name = config.registry.model_name
    experiment_id = ensure_experiment(client, config.registry.experiment, store.artifact_root)
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    metrics, calibration = read_json(layout.metrics), read_json(layout.threshold)
    spec = read_json(layout.spec)
    from detector.backbones import FEATURE_FAMILIES

    if spec["spec"]["family"] in FEATURE_FAMILIES and not (spec["spec"].get("weights") or {}).get("pretrained"):
        raise DataError(f"register: refused: the {spec['spec']['family']} model's backbone "
                        f"({spec['spec']['backbone']}) holds random weights (model.backbone_weights: "
                        f"{spec['spec'].get('backbone_weights')!r}), so its features mean nothing; set "
                        "model.backbone_weights to ImageNet weights (docs/detectors.md). Nothing was "
                        "registered and the champion is unchanged")
    kind = kind_of(config)
    spec.update(kind.serving_limits(config))  # the decoding limits an image model serves with
    origin = {**tracking.git_info(layout.root), "data_version": tracking.data_version(layout),
              "airflow_run_id": os.environ.get("AIRFLOW_CTX_DAG_RUN_ID", ""), "model_type": config.model.type}

    patch = tracking.uncommitted_patch(layout.root)
    fingerprint = model_fingerprint(layout, origin, spec, calibration, patch)
    twin = unchanged_version(client, name, fingerprint, run_id)
    if twin is not None:
        return _unchanged(layout, client, name, run_id, experiment_id, origin, twin,
                          tracking.shown(store.tracking_uri))

    test, labels = kind.test_inputs(layout)

    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as active:
        run_id = active.info.run_id
        mlflow.set_tags(origin)
        _log_run_record(layout, client, run_id, metrics, calibration, patch)
        earlier = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if earlier:  # a retried register: the version this run made already, not one more
            version = str(max(int(v.version) for v in earlier))
            model_uri = f"models:/{name}/{version}"
            print(f"register: reusing {name} v{version}, registered by this run before it was interrupted")
        else:
            model_uri, version = log_detector(
                layout.weights, spec, calibration["threshold"], kind.example(layout, test, spec), name,
                tracking.model_requirements(spec["spec"]["family"]), CODE_DIR,
                calibration_normals=layout.calibration_normals)
        wait_until_ready(client, name, version)

        candidate_model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        candidate_pred = score_frame(candidate_model, test)
        candidate = metrics_of(candidate_pred, labels)
        stage_scores = pd.read_parquet(layout.scores).query("split == 'test'").sort_values("row")["score"]
        parity = float(np.max(np.abs(candidate_pred["anomaly_score"].to_numpy() - stage_scores.to_numpy())))

        gated_against = alias_version(client, name, CHAMPION)
        results, champion, champion_note = compare(layout, candidate, gated_against, test, labels)
        champion_version = gated_against if champion is not None else None
        report = gate_rules.summarise(results)
        report.update(model_name=name, version=version, model_uri=model_uri, run_id=run_id,
                      champion_version=champion_version, gated_against=gated_against, champion_note=champion_note,
                      candidate_metrics=candidate, champion_metrics=champion, serving_parity_max_abs_diff=parity,
                      threshold=calibration["threshold"], tracking_uri=tracking.shown(store.tracking_uri))
        report = scrub_data(report)  # no password from the URI, none in an error text (champion_note)
        mlflow.log_metric("serving_parity_max_abs_diff", parity)
        mlflow.log_dict(report, "gates/gates.json")
        tag_version(client, name, version, {
            **origin, "run_id": run_id, "threshold": calibration["threshold"], FINGERPRINT_TAG: fingerprint,
            "calibration_method": calibration["method"], "fpr_bound": calibration.get("fpr_bound"),
            "gate_status": "passed" if report["passed"] else "failed", "gated_against": gated_against or "",
            "gates_failed": ",".join(report["failed"]), "gate_reasons": "; ".join(report["reasons"])[:4900],
        })
        mlflow.set_tag("gate_status", "passed" if report["passed"] else "failed")
    write_json(layout.gates, report)
    verdict = "all gates passed" if report["passed"] else "gates FAILED: " + "; ".join(report["reasons"])
    print(f"register: {name} v{version} (run {run_id}); {verdict}")
    return report


def _unchanged(layout: Layout, client, name: str, run_id: str | None, experiment_id: str, origin: dict,
               twin: tuple[str, dict], tracking_uri: str) -> dict:
    """Register nothing: this run's model is version ``twin`` already. The run records
    which version it would have been; the gate report is that version's own."""
    import mlflow

    from pipeline.secrets import scrub_data

    version, tags = twin
    passed = tags.get("gate_status") == "passed"
    failed = [f for f in tags.get("gates_failed", "").split(",") if f]
    report = {"passed": passed, "failed": failed, "reasons": [r for r in tags.get("gate_reasons", "").split("; ")
                                                             if r], "model_name": name, "version": version,
              "model_uri": f"models:/{name}/{version}", "run_id": run_id, "unchanged_of": version,
              "gated_against": None, "threshold": float(tags["threshold"]) if tags.get("threshold") else None,
              "tracking_uri": tracking_uri}
    report = scrub_data(report)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id) as active:
        report["run_id"] = active.info.run_id
        mlflow.set_tags({**origin, "unchanged_of": version, "gate_status": tags.get("gate_status", "")})
        mlflow.log_dict(report, "gates/gates.json")
    write_json(layout.gates, report)
    print(f"register: nothing changed since {name} v{version} (same data, params, code and weights): "
          "no new version registered")
    return report
