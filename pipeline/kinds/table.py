"""Tables: CSV or Parquet files of records (card transactions, machine telemetry), one row an
item, with the feature columns declared in params.yaml's ``table`` section."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.io import StageError, atomic_path
from pipeline.kinds import DataKind, test_rows
from pipeline.layout import SPLITS, Layout


def _preprocess(layout: Layout) -> dict:
    """Fit the encoding on the training rows, encode every split into float32
    rows (sorted by key, numbered by ``row``), and write the index and the encoding."""
    import pandas as pd

    from detector.transform import Transform
    from pipeline.io import write_json

    config = layout.config
    key = config.table.key_column
    manifest = pd.read_parquet(layout.manifest)
    rules = {name: rule.model_dump() for name, rule in config.table.columns.items()}
    transform = Transform.fit(manifest[manifest["split"] == "train"], rules)
    counts, parts = {}, []
    with atomic_path(layout.processed) as staging:
        staging.mkdir()
        for split in SPLITS:
            rows = manifest[manifest["split"] == split].sort_values(key, key=lambda keys: keys.astype(str))
            if rows.empty:
                raise StageError(f"the {split} split is empty: add labelled rows or change preprocess.split")
            target = staging / layout.split_items(split).relative_to(layout.processed)
            np.save(target, transform.apply(rows))
            parts.append(pd.DataFrame({
                "path": rows[key].astype(str).to_numpy(), "batch": rows["batch"].astype(str).to_numpy(),
                "label": rows[config.table.label_column].astype(str).to_numpy(),
                "is_anomaly": rows["is_anomaly"].astype(np.int64).to_numpy(), "sha256": rows["sha256"].to_numpy(),
                "split": split, "row": np.arange(len(rows), dtype=np.int64),
                "labelled": rows["labelled"].astype(bool).to_numpy()}))
            counts[split] = {"items": len(rows), "anomalies": int(rows["is_anomaly"].sum())}
        pd.concat(parts, ignore_index=True).to_parquet(staging / layout.index.relative_to(layout.processed),
                                                       index=False)
        write_json(staging / layout.transform.relative_to(layout.processed), transform.as_dict())
    print("preprocess: " + ", ".join(f"{s} {counts[s]['items']} rows ({counts[s]['anomalies']} anomalies)"
                                     for s in SPLITS) + f", {transform.width} features")
    return counts


def table_rules(config: Config):
    from components.table_validation import TableRules

    t, v = config.table, config.validation
    return TableRules(
        columns={name: rule.model_dump() for name, rule in t.columns.items()}, label_column=t.label_column,
        key_column=t.key_column, min_rows=t.min_rows, max_rows=t.max_rows, min_good=v.min_good,
        min_anomalies=v.min_anomalies, anomaly_ratio=tuple(v.anomaly_ratio), max_mean_shift=t.drift.max_mean_shift,
        max_quantile_shift=t.drift.max_quantile_shift, quantiles=tuple(t.drift.quantiles),
        drift_window=t.drift.window,
        # keys are unique across every batch that trains (the manifest: no key twice in it) and the
        # drift window; all of the snapshot when every batch trains
        key_window=None if t.train_batches is None else max(t.train_batches, t.drift.window + 1),
        # a recent batch's new categories are those none of the train_batches batches before it had
        history=t.train_batches)


def text_columns(config: Config) -> tuple[str, ...]:
    """The columns read as text from a table's files: the key and the categorical features."""
    return (config.table.key_column,
            *(name for name, rule in config.table.columns.items() if rule.type == "categorical"))


def label_columns(frame, label_column: str):
    """``labelled``, ``is_anomaly`` and ``is_normal`` of rows from their label (0, 1 or
    missing; text "0"/"1" counts; anything else is neither, and validation refused it)."""
    from components.table_stats import as_numbers

    label = as_numbers(frame[label_column]) if label_column in frame.columns else np.full(len(frame), np.nan)
    frame["labelled"] = np.isin(label, (0.0, 1.0))
    frame["is_anomaly"] = (label == 1).astype(np.int64)
    frame["is_normal"] = (label == 0).astype(np.int64)
    return frame


def _run_rows(stats: list, key: str, limit: int | None):
    """The training batches' sampled rows, or, past ``limit``, the ``limit`` of them first in
    the samples' order (components.table_stats.sample_order): as many from a batch as its share
    of the rows, chosen by key, so a run's rows do not grow with the number of batches."""
    import pandas as pd

    from components.table_stats import sample_order

    samples = [s.sample for s in stats]
    if limit is not None and sum(len(s) for s in samples) > limit:
        orders = [sample_order(s[key]) for s in samples]
        cut = np.partition(np.concatenate(orders), limit - 1)[limit - 1]
        samples = [s[order <= cut] for s, order in zip(samples, orders)]
    return pd.concat(samples, ignore_index=True)


def _table_manifest(layout: Layout):
    """The validated snapshot, from each batch's statistics (pipeline/table_stats.py: a batch
    is read once, then its statistics are stored), and the report. Only the batches a run uses
    are read: the newest ``table.train_batches`` and the drift window (all when every batch
    trains). The manifest, what preprocess trains, calibrates and tests on, is the newest
    ``table.train_batches`` batches' samples (``table.rows_per_batch`` rows of each, by key
    hash; every row of a smaller batch), at most ``table.rows_per_run`` rows of them, each row
    with its split (a hash of its key; an unlabelled row trains only: calibration and test need
    labels)."""
    from components.splits import split_of
    from components.tables import key_hash
    from components.table_validation import validate_table_stats
    from pipeline.caches import TTL_DAYS
    from pipeline.table_stats import snapshot_stats

    config = layout.config
    table = config.table
    rules = table_rules(config)
    stats, unreadable, counts = snapshot_stats(layout, rules.stats_spec(table.rows_per_batch),
                                               text_columns(config), window=rules.batches_used())
    older = (f", {counts['older']} older ones not read (beyond the drift window and table.train_batches before it)"
             if counts["older"] else "")
    gone = [f"{n} {one if n == 1 else many}" for n, one, many in (
        (counts["expired"], "stored batch", "stored batches"),
        (counts["expired_namespaces"], "store of other code, library versions or settings",
         "stores of other code, library versions or settings")) if n]
    expired = f"; removed as unused for {TTL_DAYS} days: {' and '.join(gone)}" if gone else ""
    print(f"validate: {counts['batches']} batches{older}, {counts['read']} read ({counts['rows_read']} rows), "
          f"{counts['stored']} from their stored statistics{expired}")
    report = validate_table_stats(stats, rules, unreadable)
    if not report.success:
        return None, report
    chosen = stats[-table.train_batches:] if table.train_batches else stats
    samples = _run_rows(chosen, rules.key_column, table.rows_per_run)
    if len(chosen) < len(stats) or len(samples) < report.n_files:
        bounds = [f"the newest {len(chosen)} of {counts['batches']} batches (table.train_batches)"] \
            if table.train_batches else []
        if table.rows_per_batch is not None:
            bounds.append(f"at most {table.rows_per_batch} rows of each (table.rows_per_batch)")
        if table.rows_per_run is not None:
            bounds.append(f"at most {table.rows_per_run} in all (table.rows_per_run)")
        print(f"validate: the manifest holds {len(samples)} of the {report.n_files} rows validated: "
              + ", ".join(bounds))
    # the declared columns and the pipeline's own: an undeclared column of mixed types across
    # files would not fit one Parquet column, and nothing downstream reads it
    keep = ["batch", "source", rules.key_column, rules.label_column, *rules.columns]
    manifest = label_columns(samples[[name for name in keep if name in samples.columns]].copy(), rules.label_column)
    hashes = manifest[rules.key_column].map(key_hash)
    manifest["sha256"] = hashes
    manifest["split"] = [split_of(h, config.preprocess.split.fractions) if labelled else "train"
                         for h, labelled in zip(hashes, manifest["labelled"])]
    return manifest, report


class TableKind(DataKind):
    name = "table"
    unit = "rows"
    landing_files = "CSV/Parquet files"

    @property
    def score_suffixes(self) -> frozenset[str]:
        from components.tables import TABLE_SUFFIXES

        return frozenset(TABLE_SUFFIXES)

    def check_config(self, config: Config) -> None:
        if not config.table.columns:
            raise ValueError("table.columns must declare the feature columns when data.kind is 'table'")

    def has_data(self, landing: Path) -> bool:
        return any(p.is_dir() or not p.name.startswith(".") for p in landing.iterdir())

    def generate(self, landing: Path, batch: str, seed: int, options) -> str:
        from components.tables import generate_transactions

        frame = generate_transactions(options.rows, seed, batch, fraud_rate=options.fraud_rate)
        with atomic_path(landing / f"{batch}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        return (f"wrote {landing / f'{batch}.csv'} (seed {seed}: {options.rows} transactions, "
                f"{int(frame['is_fraud'].sum())} fraud)")

    def validate(self, layout: Layout):
        return _table_manifest(layout)

    def preprocess(self, layout: Layout) -> dict:
        return _preprocess(layout)

    def items_file(self, processed: Path, split: str) -> Path:
        return processed / f"{split}_rows.npy"

    def model_spec(self, layout: Layout) -> dict:
        config = layout.config
        features = int(np.load(layout.split_items("train"), mmap_mode="r").shape[1])
        return {"family": config.model.type, "input": "table", "features": features, "width": config.model.width,
                "latent_dim": config.model.latent_dim, "eta": config.train.eta}

    def served_spec(self, layout: Layout, spec: dict) -> dict:
        """The served model encodes a client's frame with the training rows' encoding."""
        from pipeline.io import read_json

        return {"kind": "table", "transform": read_json(layout.transform)}

    def test_inputs(self, layout: Layout):
        import pandas as pd

        test, labels = test_rows(layout)
        key = layout.config.table.key_column
        manifest = pd.read_parquet(layout.manifest)
        manifest = manifest.set_index(manifest[key].astype(str))
        return manifest.loc[test["path"], list(layout.config.table.columns)].reset_index(drop=True), labels

    def example(self, layout: Layout, test, spec: dict):
        return test.head(3)

    def signature(self, meta: dict):
        """The feature columns, in the order the model was trained with, typed Any: MLflow's own
        check refuses an int column where it reads double (and a store id where it reads
        string), so the model checks the types itself (detector.transform.check_frame) and says
        which column and row are wrong."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.types.schema import AnyType

        inputs = Schema([ColSpec(AnyType(), name) for name in meta["transform"]["columns"]])
        outputs = Schema([ColSpec(DataType.double, "anomaly_score"), ColSpec(DataType.boolean, "is_anomaly"),
                          ColSpec(DataType.double, "p_value", required=False)])
        return ModelSignature(inputs=inputs, outputs=outputs)

    def score_files(self, layout: Layout, model, files: list[Path], root: Path, heatmaps: bool = False,
                    map_dir: Path | None = None):
        from pipeline.score import score_table_files

        return score_table_files(model, files, root, layout.config.table.key_column, text_columns(layout.config))
