"""The data contract: an image manifest and a Great Expectations suite over it.

``build_manifest`` decodes every file once and records one row per file.
``validate_manifest`` runs the suite and returns a report that names every failed
expectation and every offending file, in a form a person can act on at 2 a.m.
``ValidationReport``, ``gx_validate`` and ``render_html`` serve tables too
(components/table_validation.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.images import ImageFile, content_hash, format_for_extension
from components.splits import split_of
from detector.decode import DEFAULT_LIMITS, DecodeLimits, ImageDecodeError, open_image

MANIFEST_COLUMNS = [
    "path", "batch", "label", "is_anomaly", "is_normal", "ext", "bytes", "sha256", "decode_ok", "error",
    "format", "format_matches_extension", "mode", "channels", "width", "height", "mean", "std",
    "split", "labels_per_hash", "geometry", "geometry_is_majority", "batch_has_normal",
]


@dataclass(frozen=True)
class Rules:
    """What a batch must satisfy. Built from params by the stage; plain values here."""
    extensions: tuple[str, ...] = (".png", ".jpg", ".jpeg")
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG")
    allowed_modes: tuple[str, ...] = ("L", "RGB", "RGBA", "LA", "P", "I;16")
    allowed_labels: tuple[str, ...] | None = None
    min_good: int = 10
    min_anomalies: int = 10
    anomaly_ratio: tuple[float, float] = (0.02, 0.6)
    min_side: int = 16
    max_side: int = 4096
    min_std: float = 1.0
    uniform_geometry: bool = True


@dataclass
class ValidationReport:
    success: bool
    n_files: int
    label_counts: dict[str, int]
    failures: list[dict[str, Any]] = field(default_factory=list)
    gx_result: dict[str, Any] = field(default_factory=dict)
    gx_object: Any = field(default=None, repr=False)  # GX's result object(s), for its HTML renderer
    unit: str = "files"                                # what n_files counts: files, or a table's rows
    # images: the drift test of the newest batch (pipeline/kinds/image.py), with its ``message``;
    # ``refused``: it is also one of the failures
    drift: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        summary = {"success": self.success, "n_files": self.n_files, "label_counts": self.label_counts,
                   "failures": self.failures}
        return summary if self.drift is None else {**summary, "drift": self.drift}

    def describe(self) -> str:
        drift = [f"  drift: {self.drift['message']}"] if self.drift and not self.drift.get("refused") else []
        if self.success:
            return "\n".join([f"validation passed: {self.n_files} {self.unit}, labels {self.label_counts}", *drift])
        lines = [f"validation FAILED: {len(self.failures)} expectation(s) not met on {self.n_files} {self.unit}",
                 *drift]
        for failure in self.failures:
            lines.append(f"  - {failure['description']}")
            for item in failure.get("offending_files", [])[:20]:
                lines.append(f"      {item}")
            more = failure.get("unexpected_count", 0) - len(failure.get("offending_files", [])[:20])
            if failure.get("offending_files") and more > 0:
                lines.append(f"      ... and {more} more (see the JSON report)")
        return "\n".join(lines)


def _stats(image) -> tuple[float, float]:
    array = np.asarray(image.convert("L") if image.mode not in ("L", "I;16", "I") else image, dtype=np.float32)
    if image.mode in ("I;16", "I") and array.max() > 255:
        array = array / 257.0
    return float(array.mean()), float(array.std())


def _file_digest(path: Path) -> str:
    """sha256 of a file read in chunks: an oversized file is hashed, never held in memory."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(files: list[ImageFile], split_fractions: tuple[float, float, float],
                   limits: DecodeLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """One row per file: identity, label, decode outcome, geometry, intensity stats, split.

    A file over ``limits.max_bytes`` is hashed in chunks and not read whole nor decoded.
    """
    rows = []
    for item in files:
        size = item.path.stat().st_size
        data = item.path.read_bytes() if size <= limits.max_bytes else None
        digest = content_hash(data) if data is not None else _file_digest(item.path)
        row: dict[str, Any] = {
            "path": item.relpath, "batch": item.batch, "label": item.label,
            "is_anomaly": int(item.is_anomaly), "is_normal": int(not item.is_anomaly),
            "ext": item.path.suffix.lower(), "bytes": size if data is None else len(data), "sha256": digest,
            "decode_ok": False, "error": "", "format": "", "format_matches_extension": False,
            "mode": "", "channels": 0, "width": 0, "height": 0, "mean": np.nan, "std": np.nan,
            "split": split_of(digest, split_fractions),
        }
        try:
            if data is None:
                limits.check_bytes(size)  # raises: the file is over the limit
            image = open_image(data, limits)
            mean, std = _stats(image)
            row.update(decode_ok=True, format=image.format or "", mode=image.mode,
                       channels=len(image.getbands()), width=image.width, height=image.height, mean=mean, std=std,
                       format_matches_extension=format_for_extension(row["ext"]) == image.format)
            image.close()
        except ImageDecodeError as error:
            row["error"] = str(error)
        rows.append(row)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS[:19])
    if manifest.empty:
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    manifest["labels_per_hash"] = manifest.groupby("sha256")["label"].transform("nunique").astype(int)
    manifest["geometry"] = manifest["width"].astype(str) + "x" + manifest["height"].astype(str) + " " + manifest["mode"]
    decoded = manifest.loc[manifest["decode_ok"], "geometry"]
    majority = decoded.mode().iloc[0] if not decoded.empty else ""
    manifest["geometry_is_majority"] = ~manifest["decode_ok"] | (manifest["geometry"] == majority)
    # a nightly batch without good/ passes the totals when earlier batches have normal images,
    # yet it means the export of that batch is broken: every batch must bring its own
    manifest["batch_has_normal"] = manifest.groupby("batch")["is_normal"].transform("max").astype(bool)
    return manifest


def _expectations(rules: Rules) -> list[tuple[Any, str]]:
    """(expectation, sentence a person reads when it fails)."""
    import great_expectations as gx

    E = gx.expectations
    low, high = rules.anomaly_ratio
    items = [
        (E.ExpectTableRowCountToBeBetween(min_value=1), "the batch holds at least one file"),
        (E.ExpectColumnValuesToBeInSet(column="decode_ok", value_set=[True]),
         "every file decodes fully as an image (not corrupt, truncated, empty, over the decoding limits, "
         "or a decompression bomb)"),
        (E.ExpectColumnValuesToBeInSet(column="ext", value_set=list(rules.extensions)),
         f"every file has an image extension ({', '.join(rules.extensions)})"),
        (E.ExpectColumnValuesToBeInSet(column="format", value_set=list(rules.allowed_formats) + [""]),
         f"every image is encoded as one of {', '.join(rules.allowed_formats)}"),
        (E.ExpectColumnValuesToBeInSet(column="format_matches_extension", value_set=[True],
                                       row_condition="decode_ok == True", condition_parser="pandas"),
         "every file's content matches its extension"),  # files that do not decode are named above
        (E.ExpectColumnValuesToBeInSet(column="mode", value_set=list(rules.allowed_modes) + [""]),
         f"every image has an allowed mode ({', '.join(rules.allowed_modes)})"),
        (E.ExpectColumnValuesToBeBetween(column="width", min_value=rules.min_side, max_value=rules.max_side,
                                         row_condition="decode_ok == True", condition_parser="pandas"),
         f"every image is {rules.min_side}..{rules.max_side} pixels wide"),
        (E.ExpectColumnValuesToBeBetween(column="height", min_value=rules.min_side, max_value=rules.max_side,
                                         row_condition="decode_ok == True", condition_parser="pandas"),
         f"every image is {rules.min_side}..{rules.max_side} pixels high"),
        (E.ExpectColumnValuesToBeBetween(column="std", min_value=rules.min_std,
                                         row_condition="decode_ok == True", condition_parser="pandas"),
         f"no image is flat (intensity standard deviation >= {rules.min_std})"),
        (E.ExpectColumnValuesToBeBetween(column="labels_per_hash", max_value=1),
         "no identical image content appears under two labels"),
        (E.ExpectColumnValuesToBeInSet(column="batch_has_normal", value_set=[True]),
         "every batch has normal images (a good/ folder)"),
        (E.ExpectColumnSumToBeBetween(column="is_normal", min_value=rules.min_good),
         f"at least {rules.min_good} normal images (label 'good')"),
        (E.ExpectColumnSumToBeBetween(column="is_anomaly", min_value=rules.min_anomalies),
         f"at least {rules.min_anomalies} labelled anomalies"),
        (E.ExpectColumnMeanToBeBetween(column="is_anomaly", min_value=low, max_value=high),
         f"the anomaly ratio is within [{low}, {high}]"),
    ]
    if rules.allowed_labels is not None:
        items.append((E.ExpectColumnValuesToBeInSet(column="label", value_set=list(rules.allowed_labels)),
                      f"every label is one of {', '.join(rules.allowed_labels)}"))
    if rules.uniform_geometry:
        items.append((E.ExpectColumnValuesToBeInSet(column="geometry_is_majority", value_set=[True]),
                      "every image has the same size and mode as the majority"))
    return items


def quiet_gx_logging() -> None:
    """GX logs every metric it computes at INFO (and where it puts its ephemeral docs); under
    Airflow that buries the task log. Its loggers exist once it is imported."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its import logs at INFO too
    import importlib

    importlib.import_module("great_expectations")  # creates the loggers quieted below; it sets its own level

    for name in list(logging.root.manager.loggerDict):
        if name == "great_expectations" or name.startswith("great_expectations."):
            logging.getLogger(name).setLevel(logging.WARNING)


def validate_manifest(manifest: pd.DataFrame, rules: Rules) -> ValidationReport:
    """Run the suite over the manifest; the report names failed expectations and files."""
    quiet_gx_logging()

    label_counts = {str(k): int(v) for k, v in manifest["label"].value_counts().sort_index().items()} \
        if not manifest.empty else {}
    if manifest.empty:
        return ValidationReport(False, 0, {}, [{
            "expectation": "expect_table_row_count_to_be_between", "column": None,
            "description": "the batch holds at least one file: no files found", "unexpected_count": 0,
            "offending_files": []}])

    errors = dict(zip(manifest["path"], manifest["error"]))
    return _run_suite(manifest, "image_manifest", _expectations(rules), "path", errors, label_counts, "files")


def gx_validate(frame: pd.DataFrame, name: str, expectations: list[tuple[Any, str]], key: str):
    """Great Expectations' verdict of a suite of (expectation, sentence) over ``frame``, rows
    named by their ``key`` column."""
    import warnings

    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(name)
    asset = source.add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("snapshot").get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=name)
    for expectation, sentence in expectations:
        expectation.meta = {"description": sentence}
        suite.add_expectation(expectation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return batch.validate(suite, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": [key]})


def _run_suite(frame: pd.DataFrame, name: str, expectations: list[tuple[Any, str]], key: str,
               errors: dict[Any, str], label_counts: dict[str, int], unit: str) -> ValidationReport:
    """Great Expectations' suite of (expectation, sentence) over ``frame``; offending rows are
    named by their ``key`` column (with ``errors[key]`` where known)."""
    result = gx_validate(frame, name, expectations, key)
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        detail = outcome.result or {}
        offending = []
        for item in detail.get("unexpected_index_list") or []:
            path = item.get(key) if isinstance(item, dict) else item
            reason = errors.get(path, "")
            offending.append(f"{path}: {reason}" if reason else str(path))
        observed = detail.get("observed_value")
        observed = observed.item() if isinstance(observed, np.generic) else observed
        sentence = (config.meta or {}).get("description", config.type)
        exception = (outcome.exception_info or {}).get("exception_message") if not detail else None
        failures.append({
            "expectation": config.type,
            "column": config.kwargs.get("column"),
            "description": sentence + (f" (observed {observed!r})" if observed is not None else
                                       f" (could not be checked: {exception})" if exception else
                                       f" ({detail['unexpected_count']} {unit} do not)" if "unexpected_count" in detail
                                       else ""),
            "unexpected_count": int(detail.get("unexpected_count") or 0),
            "observed_value": observed if isinstance(observed, (int, float, str, type(None))) else str(observed),
            "offending_files": offending,
        })
    return ValidationReport(bool(result.success), len(frame), label_counts, failures, result.to_json_dict(), result,
                            unit)


def _plain_observed_values(result) -> None:
    """GX's renderer formats observed values with Decimal, which refuses numpy scalars
    (it logs a traceback and drops the cell); hand it plain Python numbers."""
    for item in getattr(result, "results", []) or []:
        observed = (item.result or {}).get("observed_value")
        if isinstance(observed, np.generic):
            item.result["observed_value"] = observed.item()


def render_html(report: ValidationReport) -> str:
    """Great Expectations' own HTML page for the validation result, with our summary on top."""
    import html

    quiet_gx_logging()
    body = ""
    if report.gx_object is not None:
        try:
            from great_expectations.render.renderer import ValidationResultsPageRenderer
            from great_expectations.render.view import DefaultJinjaPageView

            pages = []
            for result in report.gx_object if isinstance(report.gx_object, list) else [report.gx_object]:
                _plain_observed_values(result)
                pages.append(DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result)))
            body = pages[0]
            for page in pages[1:]:  # a table's per-batch checks: their page's content below the snapshot's
                inner = page.split("<body>", 1)[-1].rsplit("</body>", 1)[0]
                body = body.replace("</body>", inner + "</body>", 1) if "</body>" in body else body + inner
        except Exception as error:  # rendering must never hide the verdict
            body = f"<p>Great Expectations could not render its page: {html.escape(str(error))}</p>"
    summary = html.escape(report.describe())
    banner = f"<pre style='padding:1em;background:{'#e6ffed' if report.success else '#ffeef0'}'>{summary}</pre>"
    if "<body" in body:
        return body.replace("<body>", "<body>" + banner, 1)
    return f"<html><body>{banner}{body}</body></html>"
