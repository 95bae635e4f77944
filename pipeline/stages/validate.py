"""validate: manifest of every raw file + the Great Expectations suite.

On failure the stage exits non-zero (so DVC and Airflow stop), after writing the
JSON and HTML reports that name every failed expectation and offending file.
"""
from __future__ import annotations

from components.images import discover
from components.validation import Rules, build_manifest, render_html, validate_manifest
from pipeline.config import Config
from pipeline.io import DataError, atomic_path, write_json
from pipeline.layout import Layout
from pipeline.stages.preprocess import decode_limits


def rules_from(config: Config) -> Rules:
    v = config.validation
    return Rules(
        extensions=tuple(config.data.extensions), allowed_formats=tuple(v.allowed_formats),
        allowed_modes=tuple(v.allowed_modes),
        allowed_labels=tuple(v.allowed_labels) if v.allowed_labels is not None else None,
        min_good=v.min_good, min_anomalies=v.min_anomalies, anomaly_ratio=tuple(v.anomaly_ratio),
        min_side=v.min_side, max_side=v.max_side, min_std=v.min_std, uniform_geometry=v.uniform_geometry,
    )


def split_fractions(config: Config) -> tuple[float, float, float]:
    s = config.preprocess.split
    return (s.train, s.calibration, s.test)


def table_rules(config: Config):
    from components.validation import TableRules

    t, v = config.table, config.validation
    return TableRules(
        columns={name: rule.model_dump() for name, rule in t.columns.items()}, label_column=t.label_column,
        key_column=t.key_column, min_rows=t.min_rows, max_rows=t.max_rows, min_good=v.min_good,
        min_anomalies=v.min_anomalies, anomaly_ratio=tuple(v.anomaly_ratio), max_mean_shift=t.drift.max_mean_shift,
        max_quantile_shift=t.drift.max_quantile_shift, quantiles=tuple(t.drift.quantiles),
        drift_window=t.drift.window)


def text_columns(config: Config) -> tuple[str, ...]:
    """The columns read as text from a table's files: the key and the categorical features."""
    return (config.table.key_column,
            *(name for name, rule in config.table.columns.items() if rule.type == "categorical"))


def _table_manifest(layout: Layout):
    """The validated records of every batch, each with its split (a hash of its key; an
    unlabelled row trains only: calibration and test need labels), and the report."""
    import numpy as np

    from components.images import split_of
    from components.tables import key_hash, read_batches
    from components.validation import table_frame, validate_table

    config = layout.config
    rules = table_rules(config)
    frame, unreadable = read_batches(layout.raw, text_columns(config))
    report = validate_table(frame, rules, unreadable)
    if not report.success:
        return None, report
    checked = table_frame(frame, rules)
    # the declared columns and the pipeline's own: an undeclared column of mixed types across
    # files would not fit one Parquet column, and nothing downstream reads it
    keep = ["batch", "source", rules.key_column, rules.label_column, *rules.columns, "labelled", "is_anomaly",
            "is_normal"]
    manifest = checked[[name for name in keep if name in checked.columns]].copy()
    hashes = manifest[rules.key_column].map(key_hash)
    manifest["sha256"] = hashes
    manifest["split"] = [split_of(h, split_fractions(config)) if labelled else "train"
                         for h, labelled in zip(hashes, manifest["labelled"])]
    manifest["is_anomaly"] = manifest["is_anomaly"].astype(np.int64)
    return manifest, report


def run(layout: Layout) -> dict:
    config = layout.config
    if config.data.kind == "table":
        manifest, report = _table_manifest(layout)
        return _write_reports(layout, manifest, report)
    try:
        files = discover(layout.raw, config.data.extensions, include_all_files=True)
    except ValueError as error:  # a link out of the snapshot (ingest writes none: a hand-made folder)
        raise DataError(f"validate: refused: {error}") from None
    manifest = build_manifest(files, split_fractions(config), decode_limits(config))
    report = validate_manifest(manifest, rules_from(config))
    return _write_reports(layout, manifest, report)


def _write_reports(layout: Layout, manifest, report) -> dict:
    layout.validation_dir.mkdir(parents=True, exist_ok=True)
    write_json(layout.validation_gx, report.gx_result)
    with atomic_path(layout.validation_html) as tmp:
        tmp.write_text(render_html(report))
    write_json(layout.validation_summary, report.summary())
    print(report.describe())
    print(f"validation report: {layout.validation_summary} and {layout.validation_html}")
    if not report.success:
        raise DataError(f"data validation failed; report: {layout.validation_html}")
    with atomic_path(layout.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    return report.summary()
