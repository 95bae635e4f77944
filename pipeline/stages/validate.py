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


def run(layout: Layout) -> dict:
    config = layout.config
    files = discover(layout.raw, config.data.extensions, include_all_files=True)
    manifest = build_manifest(files, split_fractions(config), decode_limits(config))
    report = validate_manifest(manifest, rules_from(config))

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
