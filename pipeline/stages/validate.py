"""validate: a manifest of every item of the snapshot, checked by the data kind's Great
Expectations suite (pipeline/kinds/).

On failure the stage exits non-zero (so DVC and Airflow stop), after writing the
JSON and HTML reports that name every failed expectation and offending item.
"""
from __future__ import annotations

from components.validation import render_html
from pipeline.io import DataError, atomic_path, write_json
from pipeline.kinds import kind_of
from pipeline.layout import Layout


def run(layout: Layout) -> dict:
    manifest, report = kind_of(layout.config).validate(layout)
    layout.validation_dir.mkdir(parents=True, exist_ok=True)
    write_json(layout.validation_gx, report.gx_result)
    with atomic_path(layout.validation_html) as tmp:
        tmp.write_text(render_html(report))
    write_json(layout.validation_summary, report.summary())
    print(report.describe())
    print(f"validation report: {layout.validation_summary} and {layout.validation_html}")
    if not report.success:
        failed = "; ".join(failure["description"] for failure in report.failures[:3])
        more = f" and {len(report.failures) - 3} more" if len(report.failures) > 3 else ""
        raise DataError(f"data validation failed: {failed}{more}; report: {layout.validation_html}")
    with atomic_path(layout.manifest) as tmp:
        manifest.to_parquet(tmp, index=False)
    return report.summary()
