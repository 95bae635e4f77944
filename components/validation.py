"""The data contract: an image manifest and a Great Expectations suite over it.

``build_manifest`` decodes every file once and records one row per file.
``validate_manifest`` runs the suite and returns a report that names every failed
expectation and every offending file, in a form a person can act on at 2 a.m.
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
    """GX logs every metric it computes at INFO; under Airflow that buries the task log."""
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
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


def _run_suite(frame: pd.DataFrame, name: str, expectations: list[tuple[Any, str]], key: str,
               errors: dict[Any, str], label_counts: dict[str, int], unit: str) -> ValidationReport:
    """Great Expectations' suite of (expectation, sentence) over ``frame``; offending rows are
    named by their ``key`` column (with ``errors[key]`` where known)."""
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
        result = batch.validate(suite, result_format={
            "result_format": "COMPLETE", "unexpected_index_column_names": [key]})

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
            "column": _data_column(config.kwargs.get("column")),
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


# ---- tables (data.kind: table) ----------------------------------------------------------------

@dataclass(frozen=True)
class TableRules:
    """The declared schema of a table and the bounds a snapshot of batches must meet; plain
    values, built from params (``table`` and ``validate``) by the stage."""
    columns: dict[str, dict[str, Any]]       # name -> {type, min, max, allowed, max_null_fraction}
    label_column: str = "is_fraud"
    key_column: str = "transaction_id"
    min_rows: int = 100
    max_rows: int | None = None
    min_good: int = 10
    min_anomalies: int = 10
    anomaly_ratio: tuple[float, float] = (0.02, 0.6)
    max_mean_shift: float = 0.5
    max_quantile_shift: float = 1.0
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    drift_window: int = 30


LABEL_OK, LABEL_VALUE = "__label_ok", "__label"


def number_check(name: str) -> str:
    """The helper column that says, row by row, whether ``name`` holds a finite number (or nothing)."""
    return f"__number__{name}"


def number_value(name: str) -> str:
    """The helper column of ``name`` as numbers (missing where it is not one): ranges and drift."""
    return f"__value__{name}"


def _data_column(column: str | None) -> str | None:
    """The data column a helper column stands for, as a failure names it."""
    for prefix in ("__number__", "__value__"):
        if column and column.startswith(prefix):
            return column[len(prefix):]
    return column


def table_frame(frame: pd.DataFrame, rules: TableRules) -> pd.DataFrame:
    """The snapshot with the columns the suite reads. The label as a number (``__label``; text
    "0"/"1" counts), whether each row's label is 0, 1 or missing (``__label_ok``), ``labelled``,
    ``is_anomaly`` / ``is_normal`` (0/1; both 0 where the label is missing); for each declared
    numeric column, the column as numbers and whether each row held a finite number (or
    nothing) in ``__number__<name>`` (so a wrong value is named by its row's key) and its
    numbers in ``__value__<name>`` (for ranges and drift). The columns
    starting ``__`` are the suite's own: they are not kept in the manifest."""
    out = frame.copy()
    if rules.label_column in out.columns:
        raw = out[rules.label_column]
        label = pd.to_numeric(raw, errors="coerce")
        out[LABEL_OK] = raw.isna() | label.isin([0, 1])
        label = label.where(label.isin([0, 1]))
        out[LABEL_VALUE] = label.astype(float)
        out["labelled"] = label.notna()
        out["is_anomaly"] = (label == 1).astype(int)
        out["is_normal"] = (label == 0).astype(int)
    for name, rule in rules.columns.items():
        if rule["type"] == "numeric" and name in out.columns:
            raw = out[name]
            values = raw.astype(float) if pd.api.types.is_bool_dtype(raw) else pd.to_numeric(raw, errors="coerce")
            values = values.astype(float)
            out[number_check(name)] = raw.isna() | np.isfinite(values.to_numpy())
            out[number_value(name)] = values.where(np.isfinite(values.to_numpy()))
    return out


def _recent(frame: pd.DataFrame, window: int) -> list[str]:
    """The newest ``window`` batches: the ones each run checks batch by batch. Every batch in
    the window is checked, not the newest alone: a refused batch stays in the landing folder
    until someone removes or fixes it, and it must not pass once a newer batch lands behind it
    (as a bad image keeps failing until it is removed)."""
    return sorted(frame["batch"].astype(str).unique())[-window:]


def _in_batch(batch: str) -> dict:
    from great_expectations.expectations.row_conditions import Column

    return {"row_condition": Column("batch") == batch}


def _table_expectations(frame: pd.DataFrame, rules: TableRules) -> tuple[list[tuple[Any, str]], list[tuple[Any, str]]]:
    """(the expectations over the whole snapshot, those over single recent batches). The
    second run on the recent batches' rows alone: each filters its rows by batch, and over the
    whole history that filtering would grow with every night."""
    import great_expectations as gx

    E = gx.expectations
    key, label = rules.key_column, rules.label_column
    items: list[tuple[Any, str]] = [
        (E.ExpectTableRowCountToBeBetween(min_value=rules.min_rows, max_value=rules.max_rows),
         f"the snapshot holds at least {rules.min_rows} rows" + (f" and at most {rules.max_rows}" if rules.max_rows
                                                                 else "")),
    ]
    for name in [key, label, *rules.columns]:
        items.append((E.ExpectColumnToExist(column=name), f"the column '{name}' exists"))
    present = set(frame.columns)
    if key in present:
        items += [(E.ExpectColumnValuesToNotBeNull(column=key), f"every row has a key ('{key}')"),
                  (E.ExpectColumnValuesToBeUnique(column=key), f"no key ('{key}') appears twice")]
    if label in present:
        low, high = rules.anomaly_ratio
        items += [
            (E.ExpectColumnValuesToBeInSet(column=LABEL_OK, value_set=[True]),
             f"every label ('{label}') is 0 (normal), 1 (anomaly) or missing"),
            (E.ExpectColumnSumToBeBetween(column="is_normal", min_value=rules.min_good),
             f"at least {rules.min_good} rows labelled normal"),
            (E.ExpectColumnSumToBeBetween(column="is_anomaly", min_value=rules.min_anomalies),
             f"at least {rules.min_anomalies} rows labelled anomalous"),
            (E.ExpectColumnMeanToBeBetween(column=LABEL_VALUE, min_value=low, max_value=high),
             f"the anomaly ratio of the labelled rows is within [{low}, {high}]"),
        ]
    batches = sorted(frame["batch"].astype(str).unique()) if "batch" in present else []
    recent = _recent(frame, rules.drift_window) if batches else []
    pairs = [(b, batches[batches.index(b) - 1]) for b in recent if batches.index(b) > 0]
    per_batch: list[tuple[Any, str]] = []
    for name, rule in rules.columns.items():
        if name not in present:
            continue
        allowed_null = float(rule.get("max_null_fraction") or 0.0)
        items.append((E.ExpectColumnValuesToNotBeNull(column=name, mostly=1.0 - allowed_null),
                      f"at most {allowed_null:.0%} of '{name}' is missing"))
        if len(batches) > 1:  # the bound holds for each recent batch too, not only the whole history
            per_batch += [(E.ExpectColumnValuesToNotBeNull(column=name, mostly=1.0 - allowed_null, **_in_batch(b)),
                       f"at most {allowed_null:.0%} of '{name}' is missing in batch {b}") for b in recent]
        if rule["type"] == "numeric":
            items.append((E.ExpectColumnValuesToBeInSet(column=number_check(name), value_set=[True]),
                          f"'{name}' holds finite numbers"))
            if rule.get("min") is not None or rule.get("max") is not None:
                items.append((E.ExpectColumnValuesToBeBetween(column=number_value(name), min_value=rule.get("min"),
                                                              max_value=rule.get("max")),
                              f"'{name}' is within [{rule.get('min')}, {rule.get('max')}]"))
            for newest, reference in pairs if rule.get("drift", True) else []:
                per_batch += _drift(E, frame, name, newest, reference, rules)
        else:
            allowed = rule.get("allowed")
            if allowed is not None:
                items.append((E.ExpectColumnValuesToBeInSet(column=name, value_set=list(allowed)),
                              f"every '{name}' is one of the declared categories ({', '.join(allowed)})"))
            elif rule.get("drift", True):
                for newest, _ in pairs:
                    seen = sorted(frame.loc[frame["batch"] < newest, name].dropna().astype(str).unique())
                    per_batch.append((E.ExpectColumnValuesToBeInSet(column=name, value_set=seen,
                                                                    **_in_batch(newest)),
                                      f"batch {newest} has no '{name}' category the earlier batches never had"))
    return items, per_batch


def _drift(E, frame: pd.DataFrame, name: str, newest: str, reference: str, rules: TableRules) -> list:
    """Batch ``newest``'s mean and quantiles of ``name`` within the bounds (in standard
    deviations of the ``reference`` batch, the one accepted before it) around the reference's.

    Where every value of the reference batch was the same (a flag that stayed 0 all day), its
    standard deviation is 0 and any change at all would be drift: the unit is then the
    standard deviation over all batches before ``newest``, and only a column that never
    varied keeps a unit of (almost) nothing."""
    column = number_value(name)
    ref = frame.loc[frame["batch"] == reference, column].dropna()
    if len(ref) < 2:
        return []
    std, unit = float(ref.std()), f"batch {reference}'s standard deviations"
    if not std > 0:
        std = float(frame.loc[frame["batch"] < newest, column].std()) or 1e-9
        unit = f"standard deviations of the batches before it (batch {reference}'s values were all equal)"
    mean, k = float(ref.mean()), rules.max_mean_shift
    items = [(E.ExpectColumnMeanToBeBetween(column=column, min_value=mean - k * std,
                                            max_value=mean + k * std, **_in_batch(newest)),
              f"'{name}' has not drifted: the mean of batch {newest} is within {k:g} {unit} of "
              f"batch {reference}'s ({mean:.4g} +- {k * std:.4g})")]
    q = rules.max_quantile_shift
    ranges = [[float(v) - q * std, float(v) + q * std] for v in ref.quantile(list(rules.quantiles))]
    items.append((E.ExpectColumnQuantileValuesToBeBetween(
        column=column, quantile_ranges={"quantiles": list(rules.quantiles), "value_ranges": ranges},
        **_in_batch(newest)),
        f"'{name}' has not drifted: batch {newest}'s quantiles {', '.join(f'{x:g}' for x in rules.quantiles)} are "
        f"within {q:g} {unit} of batch {reference}'s"))
    return items


def validate_table(frame: pd.DataFrame, rules: TableRules, unreadable: list[str] = ()) -> ValidationReport:
    """The table suite over a snapshot of batches (``frame`` with a ``batch`` column, as
    components.tables.read_batches gives it); files that could not be read fail it too."""
    quiet_gx_logging()
    frame = table_frame(frame, rules)
    counts = {}
    if "is_anomaly" in frame.columns:
        counts = {"normal": int(frame["is_normal"].sum()), "anomaly": int(frame["is_anomaly"].sum()),
                  "unlabelled": int((~frame["labelled"]).sum())}
    failures = [{"expectation": "readable_files", "column": None, "description": f"a batch file cannot be read: "
                 f"{reason}", "unexpected_count": 1, "offending_files": []} for reason in unreadable]
    if frame.empty:
        return ValidationReport(False, 0, counts, unit="rows", failures=failures + [{
            "expectation": "expect_table_row_count_to_be_between", "column": None,
            "description": "the snapshot holds at least one row: no rows found", "unexpected_count": 0,
            "offending_files": []}])
    key = rules.key_column if rules.key_column in frame.columns else "batch"
    whole, per_batch = _table_expectations(frame, rules)
    report = _run_suite(frame, "table", whole, key, {}, counts, "rows")
    if per_batch:  # the recent batches and the one before the oldest of them: what the checks read
        batches = sorted(frame["batch"].astype(str).unique())
        window = batches[-(rules.drift_window + 1):]
        recent = _run_suite(frame[frame["batch"].isin(window)], "table_recent_batches", per_batch, key, {}, counts,
                            "rows")
        report.failures += recent.failures
        report.success = report.success and recent.success
        report.gx_result = {"snapshot": report.gx_result, "recent_batches": recent.gx_result}
        report.gx_object = [report.gx_object, recent.gx_object]
    if failures:
        report.failures[:0] = failures
        report.success = False
    return report
