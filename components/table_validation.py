"""The data contract of a table (data.kind: table): the declared schema's rules checked against
each batch's statistics (components/table_stats.py), with Great Expectations as the contract
and the report, at a cost that does not grow with the width of the table.

The report is components.validation's ``ValidationReport``, as for images: the stage, its
JSON and HTML pages and its failures read alike for both kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from components.validation import ValidationReport, gx_validate, quiet_gx_logging


@dataclass(frozen=True)
class TableRules:
    """The declared schema of a table and the bounds a snapshot of batches must meet; plain
    values, built from params (``table`` and ``validate``) by the stage."""
    columns: dict[str, dict[str, Any]]       # name -> {type, min, max, allowed, max_null_fraction, drift}
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
    key_window: int | None = None    # keys are unique across the newest this many batches (None: all)
    history: int | None = None       # a recent batch is compared with this many batches before it (None: all)

    def batches_used(self) -> int | None:
        """How many of the newest batches the suite needs (None: all): the recent ones and, for
        the oldest of them, its ``history``; this covers ``key_window`` too."""
        return None if self.history is None else self.drift_window + self.history

    def stats_spec(self, sample_rows: int | None = None):
        """What per-batch statistics these rules are checked against (components/table_stats.py)."""
        from components.table_stats import StatsSpec

        return StatsSpec({name: rule["type"] for name, rule in self.columns.items()}, self.key_column,
                         self.label_column, sample_rows)


# the checks of a table snapshot: (kind, the sentence GX's report shows for the kind). Each is
# one expectation over a frame of one row per check instance (a column, a column in a batch),
# so the suite's cost does not grow with the width of the table.
TABLE_CHECKS = {
    "rows": "the snapshot holds the number of rows it must",
    "exists": "every declared column, the key and the label exist in every batch",
    "key_present": "every row has a key",
    "key_unique": "no key appears twice (within a batch, or across the batches that train and the recent ones)",
    "labels": "every label is 0 (normal), 1 (anomaly) or missing",
    "normal": "enough rows are labelled normal",
    "anomalies": "enough rows are labelled anomalous",
    "ratio": "the anomaly ratio of the labelled rows is within its bounds",
    "nulls": "no column has more missing values than it allows, in the snapshot and in each recent batch",
    "numbers": "numeric columns hold finite numbers",
    "range": "numeric columns are within their declared ranges",
    "categories": "categorical columns hold only their declared categories",
    "new_categories": "no recent batch brings a category that the earlier batches never had",
    "mean": "no numeric column's mean drifted from the batch before",
    "quantiles": "no numeric column's quantiles drifted from the batch before",
}
VALUED = {"rows", "normal", "anomalies", "ratio"}  # checked by GX against bounds; the others are pass/fail


def _before(batches: list[str], batch: str, history: int | None) -> list[str]:
    """The batches ``batch`` is compared with: the ``history`` batches right before it (all with
    None). A fixed number, so a recent batch gets the same verdict every night it is checked,
    whatever has left the window since."""
    i = batches.index(batch)
    return batches[:i] if history is None else batches[max(0, i - history):i]


def _recent(batches: list[str], window: int) -> list[str]:
    """The newest ``window`` batches: the ones each run checks batch by batch. Every batch in
    the window is checked, not the newest alone: a refused batch stays in the landing folder
    until someone removes or fixes it, and it must not pass once a newer batch lands behind it
    (as a bad image keeps failing until it is removed)."""
    return batches[-window:]


class _Checks:
    """Check instances as GX rows, with the failure each becomes when GX finds it failed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.failures: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, ident: str, value: Any, failure: dict[str, Any] | None) -> None:
        check = f"{kind}:{ident}"
        self.rows.append({"check": check, kind: value})
        if failure is not None:
            self.failures[check] = {"expectation": kind, "column": None, "unexpected_count": 0,
                                    "observed_value": None, "offending_files": [], **failure}

    def passfail(self, kind: str, ident: str, ok: bool, column: str | None, description: str,
                 count: int = 0, offending: list[str] | None = None, observed: Any = None) -> None:
        self.add(kind, ident, bool(ok), None if ok else {
            "column": column, "description": description, "unexpected_count": int(count),
            "offending_files": list(offending or [])[:20], "observed_value": observed})


def _rows_do_not(count: int, exact: bool = True) -> str:
    return f" ({'' if exact else 'at least '}{count} rows do not)"


def _label_checks(checks: _Checks, stats: list, rules: TableRules) -> dict[str, int]:
    label = rules.label_column
    parts = [s.summary["label"] for s in stats if s.summary["label"] is not None]
    if not parts:
        return {}
    counts = {k: sum(p[k] for p in parts) for k in ("normal", "anomaly", "unlabelled", "bad")}
    bad_rows = [r for p in parts for r in p["bad_rows"]]
    checks.passfail("labels", label, counts["bad"] == 0, label,
                    f"every label ('{label}') is 0 (normal), 1 (anomaly) or missing" + _rows_do_not(counts["bad"]),
                    counts["bad"], bad_rows)
    low, high = rules.anomaly_ratio
    labelled = counts["normal"] + counts["anomaly"]
    ratio = counts["anomaly"] / labelled if labelled else None
    checks.add("normal", "snapshot", counts["normal"], {
        "column": label, "observed_value": counts["normal"],
        "description": f"at least {rules.min_good} rows labelled normal (observed {counts['normal']})"})
    checks.add("anomalies", "snapshot", counts["anomaly"], {
        "column": label, "observed_value": counts["anomaly"],
        "description": f"at least {rules.min_anomalies} rows labelled anomalous (observed {counts['anomaly']})"})
    checks.add("ratio", "snapshot", ratio, {
        "column": label, "observed_value": ratio,
        "description": f"the anomaly ratio of the labelled rows is within [{low}, {high}] (observed {ratio!r})"})
    return {"normal": counts["normal"], "anomaly": counts["anomaly"], "unlabelled": counts["unlabelled"]}


def _key_checks(checks: _Checks, stats: list, recent: list[str], rules: TableRules) -> None:
    key = rules.key_column
    parts = [s for s in stats if s.summary["key"] is not None]
    if not parts:
        return
    nulls = sum(s.summary["key"]["nulls"] for s in parts)
    checks.passfail("key_present", key, nulls == 0, key, f"every row has a key ('{key}')" + _rows_do_not(nulls),
                    nulls, [r for s in parts for r in s.summary["key"]["null_rows"]])
    for s in parts:
        repeated = s.summary["key"]["duplicates"]
        checks.passfail("key_unique", s.batch, repeated == 0, key,
                        f"no key ('{key}') appears twice in batch {s.batch} ({repeated} repeated keys)", repeated,
                        s.summary["key"]["duplicate_rows"])
    # across batches: every batch that trains (the manifest) and the recent ones, or the whole
    # snapshot (key_window None); each batch's sorted hashes, deduplicated (a batch without
    # repeated keys as it is)
    scope = parts if rules.key_window is None else parts[-max(rules.key_window, len(recent) + 1):]
    if len(scope) > 1:
        from components.table_stats import repeated_across

        def distinct(s) -> np.ndarray:
            hashes = np.asarray(s.key_hashes)
            if not s.summary["key"]["duplicates"] or not len(hashes):
                return hashes
            return hashes[np.r_[True, hashes[1:] != hashes[:-1]]]

        twice = repeated_across([distinct(s) for s in scope])
        shared = set()
        for value in twice[:200]:  # which batches hold the first of them
            holders = [s.batch for s in scope if _holds(s.key_hashes, value)]
            shared.add(" and ".join(holders))
        span = "the snapshot's batches" if rules.key_window is None else f"the newest {len(scope)} batches"
        checks.passfail("key_unique", "across batches", len(twice) == 0, key,
                        f"no key ('{key}') appears in two of {span} ({len(twice)} keys do: "
                        + "; ".join(sorted(shared)[:5]) + ")", len(twice))


def _holds(sorted_hashes: np.ndarray, value) -> bool:
    position = int(np.searchsorted(sorted_hashes, value))
    return position < len(sorted_hashes) and sorted_hashes[position] == value


def _column_checks(checks: _Checks, stats: list, recent: list[str], rules: TableRules) -> None:
    batches = [s.batch for s in stats]
    multi = len(batches) > 1
    pairs = [(b, batches[batches.index(b) - 1]) for b in recent if batches.index(b) > 0]
    by_batch = {s.batch: s for s in stats}
    quantiles = _Quantiles(rules.quantiles)
    for name, rule in rules.columns.items():
        present = [s for s in stats if s.column(name) is not None]
        if not present:
            continue
        rows = sum(s.rows for s in present)
        nulls = sum(s.column(name)["nulls"] for s in present)
        allowed_null = float(rule.get("max_null_fraction") or 0.0)
        null_rows = [r for s in present for r in s.column(name)["null_rows"]]
        checks.passfail("nulls", name, nulls <= allowed_null * rows + 1e-9, name,
                        f"at most {allowed_null:.0%} of '{name}' is missing ({nulls} of {rows} rows are)", nulls,
                        null_rows, nulls / rows if rows else None)
        if multi:  # the bound holds for each recent batch too, not only the whole history
            for batch in recent:
                column = by_batch[batch].column(name)
                if column is None:
                    continue
                n, size = column["nulls"], by_batch[batch].rows
                checks.passfail("nulls", f"{name}:{batch}", n <= allowed_null * size + 1e-9, name,
                                f"at most {allowed_null:.0%} of '{name}' is missing in batch {batch} "
                                f"({n} of {size} rows are)", n, column["null_rows"], n / size if size else None)
        if rule["type"] == "numeric":
            bad = sum(s.column(name)["non_numbers"] for s in present)
            checks.passfail("numbers", name, bad == 0, name, f"'{name}' holds finite numbers" + _rows_do_not(bad),
                            bad, [r for s in present for r in s.column(name)["non_number_rows"]])
            _range_check(checks, name, rule, present)
            if rule.get("drift", True):
                for newest, reference in pairs:
                    _drift_checks(checks, name, by_batch[newest], by_batch[reference],
                                  [by_batch[b] for b in _before(batches, newest, rules.history)], rules, quantiles)
        else:
            _category_checks(checks, name, rule, present, pairs, by_batch, batches, rules.history)


def _range_check(checks: _Checks, name: str, rule: dict, present: list) -> None:
    from components.table_stats import EXTREMES

    low, high = rule.get("min"), rule.get("max")
    if low is None and high is None:
        return
    outside: list[tuple[float, str]] = []
    exact = True
    for s in present:
        column = s.column(name)
        below = [(v, r) for v, r in column["smallest"] if low is not None and v < low]
        above = [(v, r) for v, r in column["largest"] if high is not None and v > high]
        exact = exact and len(below) < EXTREMES and len(above) < EXTREMES
        outside += below + above
    checks.passfail("range", name, not outside, name,
                    f"'{name}' is within [{low}, {high}]" + _rows_do_not(len(outside), exact), len(outside),
                    [f"{r}: {v:g}" for v, r in outside])


class _Quantiles:
    """The drift quantiles of a column in a batch's sample, computed once: a batch is the newer
    one of one pair and the reference of the next."""

    def __init__(self, wanted: tuple[float, ...]):
        self.wanted, self.found = list(wanted), {}

    def __call__(self, stats, name: str) -> tuple[int, np.ndarray | None]:
        """(how many finite values the sample holds, their quantiles; None without any)."""
        from components.table_stats import as_numbers

        if (stats.batch, name) not in self.found:
            values = as_numbers(stats.sample[name]) if name in stats.sample.columns else np.empty(0)
            values = values[np.isfinite(values)]
            self.found[stats.batch, name] = (len(values), np.quantile(values, self.wanted) if len(values) else None)
        return self.found[stats.batch, name]


def _drift_checks(checks: _Checks, name: str, newest, reference, before: list, rules: TableRules,
                  quantiles: _Quantiles) -> None:
    """Batch ``newest``'s mean and quantiles of ``name`` within the bounds (in standard
    deviations of the ``reference`` batch, the one accepted before it) around the reference's.

    Where every value of the reference batch was the same (a flag that stayed 0 all day), its
    standard deviation is 0 and any change at all would be drift: the unit is then the
    standard deviation over all batches before ``newest``, and only a column that never
    varied keeps a unit of (almost) nothing. Means and standard deviations are exact (from
    each batch's statistics); quantiles come from each batch's sample (exact up to
    ``table.rows_per_batch`` rows)."""
    from components.table_stats import pooled_std

    new = newest.column(name)
    usable = [s for s in before if ((s.column(name) or {}).get("count") or 0) >= 2]
    if new is None or not usable:  # a missing column is refused as such; nothing earlier: as the first batch
        return
    if not (reference.column(name) or {}).get("count", 0) >= 2:  # the batch before had no spread to measure:
        reference = usable[-1]                                   # the newest earlier batch that has one
    ref = reference.column(name)
    if not new.get("count"):
        checks.passfail("mean", f"{name}:{newest.batch}", False, name,
                        f"'{name}' has not drifted: batch {newest.batch} has no number in it to compare with batch "
                        f"{reference.batch}'s (every value missing or not a number)")
        return
    std = pooled_std([ref])
    unit = f"batch {reference.batch}'s standard deviations"
    if not std > 0:
        std = pooled_std([s.column(name) for s in before if s.column(name) is not None])
        std = std if std > 0 else 1e-9
        unit = f"standard deviations of the batches before it (batch {reference.batch}'s values were all equal)"
    mean, k = float(ref["mean"]), rules.max_mean_shift
    observed = float(new["mean"])
    ident = f"{name}:{newest.batch}"
    checks.passfail("mean", ident, abs(observed - mean) <= k * std, name,
                    f"'{name}' has not drifted: the mean of batch {newest.batch} is within {k:g} {unit} of "
                    f"batch {reference.batch}'s ({mean:.4g} +- {k * std:.4g}) (observed {observed:.4g})",
                    observed=observed)
    q = rules.max_quantile_shift
    (ref_count, expected), (new_count, seen) = quantiles(reference, name), quantiles(newest, name)
    if ref_count < 2 or not new_count:
        return
    wanted = quantiles.wanted
    ok = bool(np.all(np.abs(seen - expected) <= q * std))
    checks.passfail("quantiles", ident, ok, name,
                    f"'{name}' has not drifted: batch {newest.batch}'s quantiles {', '.join(f'{x:g}' for x in wanted)} "
                    f"are within {q:g} {unit} of batch {reference.batch}'s (observed "
                    f"{', '.join(f'{v:.4g}' for v in seen)} against {', '.join(f'{v:.4g}' for v in expected)})",
                    observed=[float(v) for v in seen])


def _category_checks(checks: _Checks, name: str, rule: dict, present: list, pairs: list, by_batch: dict,
                     batches: list[str], history: int | None) -> None:
    from components.table_stats import MAX_CATEGORIES

    allowed = rule.get("allowed")
    overflowing = [s.batch for s in present if s.column(name)["overflow"]]
    if overflowing and (allowed is not None or rule.get("drift", True)):
        # the statistics keep MAX_CATEGORIES distinct values a batch: past that, a category
        # check would compare part of the column; it fails instead of passing on what it saw
        checks.passfail("categories", f"{name}:overflow", False, name,
                        f"'{name}' has more than {MAX_CATEGORIES:,} distinct values in batch "
                        f"{', '.join(overflowing[:5])}: its categories cannot be checked (an identifier or a free "
                        "text is no category: declare it with drift: false and no allowed list, or leave it out)",
                        len(overflowing), overflowing)
        return
    if allowed is not None:
        unknown = {c: v for s in present for c, v in s.column(name)["categories"].items() if c not in set(allowed)}
        count = sum(sum(v[0] for s in present for c, v in s.column(name)["categories"].items() if c == u)
                    for u in unknown)
        checks.passfail("categories", name, not unknown, name,
                        f"every '{name}' is one of the declared categories ({', '.join(allowed)})"
                        + _rows_do_not(count), count, [f"{v[1]}" for v in unknown.values()],
                        observed=sorted(unknown)[:20])
        return
    if not rule.get("drift", True):
        return
    for newest, _ in pairs:
        column = by_batch[newest].column(name)
        if column is None:
            continue
        seen: set[str] = set()
        for batch in _before(batches, newest, history):
            earlier = by_batch[batch].column(name)
            if earlier is not None:
                seen.update(earlier["categories"])
        new = {c: v for c, v in column["categories"].items() if c not in seen}
        count = sum(v[0] for v in new.values())
        checks.passfail("new_categories", f"{name}:{newest}", not new, name,
                        f"batch {newest} has no '{name}' category the earlier batches never had"
                        + _rows_do_not(count) + (f": {', '.join(sorted(new)[:10])}" if new else ""),
                        count, [v[1] for v in new.values()], observed=sorted(new)[:20])


def validate_table_stats(stats: list, rules: TableRules, unreadable: list[str] = ()) -> ValidationReport:
    """The table suite over a snapshot's per-batch statistics (components/table_stats.py, one
    per batch, in batch order); files that could not be read fail it too. Every check is
    computed from the statistics (vectorised, once per column or column and recent batch) and
    handed to Great Expectations as one row of a small frame, under one expectation per kind
    of check: GX stays the contract and the report, at a cost that does not grow with the
    number of columns or of rows."""
    quiet_gx_logging()
    import great_expectations as gx

    stats = sorted(stats, key=lambda s: s.batch)
    failures = [{"expectation": "readable_files", "column": None, "description": f"a batch file cannot be read: "
                 f"{reason}", "unexpected_count": 1, "offending_files": []} for reason in unreadable]
    rows = sum(s.rows for s in stats)
    checks = _Checks()
    counts = _label_checks(checks, stats, rules)
    if rows == 0:
        return ValidationReport(False, 0, counts, unit="rows", failures=failures + [{
            "expectation": "expect_table_row_count_to_be_between", "column": None,
            "description": "the snapshot holds at least one row: no rows found", "unexpected_count": 0,
            "offending_files": []}])
    bound = f"at least {rules.min_rows} rows" + (f" and at most {rules.max_rows}" if rules.max_rows else "")
    checks.add("rows", "snapshot", rows, {"observed_value": rows,
                                          "description": f"the snapshot holds {bound} (observed {rows})"})
    batches = [s.batch for s in stats]
    for name in [rules.key_column, rules.label_column, *rules.columns]:
        missing = [s.batch for s in stats if (s.summary["key"] is None if name == rules.key_column else
                                              s.summary["label"] is None if name == rules.label_column else
                                              s.column(name) is None)]
        # a file of a batch exported without the column (the batch's other files have it)
        files = [f"{s.batch}: {source}" for s in stats if s.batch not in missing
                 for source in s.summary.get("absent", {}).get(name, [])]
        where = "" if len(missing) == len(batches) else \
            f" in every batch and file (missing in {', '.join((missing + files)[:10])})"
        checks.passfail("exists", name, not missing and not files, name, f"the column '{name}' exists{where}",
                        len(missing) + len(files), missing + files)
    recent = _recent(batches, rules.drift_window)
    _key_checks(checks, stats, recent, rules)
    _column_checks(checks, stats, recent, rules)

    E = gx.expectations
    low, high = rules.anomaly_ratio
    bounds = {"rows": (rules.min_rows, rules.max_rows), "normal": (rules.min_good, None),
              "anomalies": (rules.min_anomalies, None), "ratio": (low, high)}
    frame = pd.DataFrame(checks.rows)
    expectations = []
    for kind, sentence in TABLE_CHECKS.items():
        if kind not in frame.columns:
            continue
        if kind in VALUED:
            frame[kind] = pd.to_numeric(frame[kind])
            low_bound, high_bound = bounds[kind]
            expectation = E.ExpectColumnValuesToBeBetween(column=kind, min_value=low_bound, max_value=high_bound)
        else:
            frame[kind] = frame[kind].astype(object)
            expectation = E.ExpectColumnValuesToBeInSet(column=kind, value_set=[True])
        expectations.append((expectation, sentence))
    result = gx_validate(frame, "table", expectations, "check")
    for outcome in result.results:
        if outcome.success:
            continue
        detail = outcome.result or {}
        kind = outcome.expectation_config.kwargs.get("column")
        failed = [item.get("check") if isinstance(item, dict) else item
                  for item in detail.get("unexpected_index_list") or []]
        if not failed and not detail:  # GX could not run it: say so rather than pass it
            reason = (outcome.exception_info or {}).get("exception_message")
            failures.append({"expectation": kind, "column": None, "unexpected_count": 0, "offending_files": [],
                             "description": f"{TABLE_CHECKS.get(kind, kind)} (could not be checked: {reason})"})
        failures += [checks.failures[check] for check in failed if check in checks.failures]
    success = bool(result.success) and not failures
    return ValidationReport(success, rows, counts, failures, result.to_json_dict(), result, "rows")


def validate_table(frame: pd.DataFrame, rules: TableRules, unreadable: list[str] = ()) -> ValidationReport:
    """The table suite over a snapshot already in memory (``frame`` with a ``batch`` column,
    as components.tables.read_batches gives it): its per-batch statistics (every row sampled),
    then ``validate_table_stats``. The pipeline streams each file instead (pipeline/table_stats.py)."""
    from components.table_stats import batch_stats, frame_chunks

    spec = rules.stats_spec(sample_rows=None)
    stats = []
    if not frame.empty:
        batches = frame["batch"].astype(str) if "batch" in frame.columns else pd.Series("batch", index=frame.index)
        for batch, group in frame.groupby(batches, sort=True):
            stats.append(batch_stats(str(batch), lambda g=group: frame_chunks(g, spec), spec))
    return validate_table_stats(stats, rules, unreadable)
