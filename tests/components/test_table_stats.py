"""Per-batch statistics of tables (components/table_stats.py) and the suite over them at
telemetry width: a chunked Parquet read gives the statistics of the whole file, the sample
is the same rows whatever the chunking, and a 1,000-column table is validated by a fixed
number of expectations that name the one bad column, without a pandas warning per column."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from components.table_stats import StatsSpec, batch_stats, frame_chunks, pooled_std, repeated_across
from components.tables import generate_transactions, iter_table_file
from components.table_validation import TABLE_CHECKS, TableRules, validate_table

TYPES = {"amount": "numeric", "hour": "numeric", "merchant_category": "categorical",
         "distance_from_home_km": "numeric", "device_changed": "numeric", "card_present": "numeric",
         "transactions_last_24h": "numeric", "channel": "categorical"}
TEXT = ("transaction_id", "merchant_category", "channel")


def _streamed(path, spec: StatsSpec, chunk_rows: int):
    return batch_stats("batch-0001", lambda: ((c, path.name) for c in iter_table_file(path, TEXT, chunk_rows)), spec)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_file_streamed_in_chunks_has_the_statistics_of_the_whole_file(tmp_path, suffix):
    frame = generate_transactions(2500, 3)
    frame.loc[[10, 2000], "amount"] = np.nan
    frame["amount"] = [None if pd.isna(v) else str(v) for v in frame["amount"]]  # a text column, as exports go
    frame.loc[1999, "amount"] = "err"   # in the third chunk of 700 rows (a CSV reads "n/a" as missing)
    path = tmp_path / f"batch-0001{suffix}"
    (frame.to_parquet if suffix == ".parquet" else frame.to_csv)(path, index=False)
    assert [len(c) for c in iter_table_file(path, TEXT, 700)] == [700, 700, 700, 400]
    spec = StatsSpec(TYPES, "transaction_id", "is_fraud", sample_rows=500)
    chunked, whole = _streamed(path, spec, 700), _streamed(path, spec, 10_000)

    amount = pd.to_numeric(frame["amount"], errors="coerce").dropna()
    for stats in (chunked, whole):
        column = stats.column("amount")
        assert stats.rows == 2500 and column["nulls"] == 2 and column["non_numbers"] == 1
        assert column["non_number_rows"] == [frame.loc[1999, "transaction_id"]]
        assert column["count"] == len(amount)
        assert column["mean"] == pytest.approx(amount.mean(), rel=1e-12)
        assert pooled_std([column]) == pytest.approx(amount.std(), rel=1e-9)
        assert [v for v, _ in column["smallest"]] == sorted(amount)[:20]
        assert [v for v, _ in column["largest"]] == sorted(amount, reverse=True)[:20]
        assert stats.summary["label"]["anomaly"] == int(frame["is_fraud"].sum())
        categories = stats.column("channel")["categories"]
        assert {c: v[0] for c, v in categories.items()} == frame["channel"].value_counts().to_dict()
        assert len(stats.key_hashes) == 2500 and np.all(np.diff(stats.key_hashes.astype(np.float64)) >= 0)
    # the sample is the same rows whatever the chunking: the 500 with the smallest salted key hash
    assert len(chunked.sample) == 500
    assert sorted(chunked.sample["transaction_id"]) == sorted(whole.sample["transaction_id"])
    # and a sample, not the file's first rows
    assert chunked.sample["transaction_id"].isin(frame["transaction_id"].iloc[:500]).mean() < 0.5


@pytest.mark.parametrize("threads", [1, 3])
def test_keys_repeated_across_batches_are_found_exactly_at_every_slice_edge(threads):
    rng = np.random.default_rng(3)
    edges = [0, 1, 2**58 - 1, 2**58, 2**58 + 1, 2**63, 2**64 - 2, 2**64 - 1]  # the slices' borders and ends
    arrays = [np.unique(rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True))
              for size in (5_000, 20_000, 0, 1, 7_000)]
    shared = np.array(edges + [int(v) for v in rng.choice(arrays[1], 30, replace=False)], dtype=np.uint64)
    arrays[0] = np.unique(np.concatenate([arrays[0], shared[:20]]))
    arrays[1] = np.unique(np.concatenate([arrays[1], shared[:8]]))
    arrays[4] = np.unique(np.concatenate([arrays[4], shared[8:]]))
    merged = np.sort(np.concatenate(arrays))
    expected = merged[1:][merged[1:] == merged[:-1]]          # the plain merge it replaces
    found = repeated_across(arrays, threads=threads)
    assert found.dtype == np.uint64 and len(found) >= len(edges)
    np.testing.assert_array_equal(found, expected)
    assert not len(repeated_across([arrays[2], arrays[3]])) and not len(repeated_across([arrays[0]]))


def test_repeated_keys_within_a_batch_are_counted_and_named():
    frame = generate_transactions(1200, 4)
    frame.loc[1100, "transaction_id"] = frame.loc[5, "transaction_id"]
    spec = StatsSpec(TYPES, "transaction_id", "is_fraud")
    key = batch_stats("b", lambda: frame_chunks(frame, spec), spec).summary["key"]
    assert key["duplicates"] == 1 and key["duplicate_rows"] == [frame.loc[5, "transaction_id"]]


def _wide(rows: int, columns: int, seed: int, batch: str) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, columns)) * np.linspace(1, 50, columns)
    values[:, : columns // 3] = 7.0                      # sensors that never move in training
    frame = pd.DataFrame(values, columns=[f"s{i:04d}" for i in range(columns)])
    frame.insert(0, "id", [f"{batch}-{i}" for i in range(rows)])
    frame["label"] = (rng.random(rows) < 0.05).astype(int)
    frame["batch"] = batch
    return frame


def test_a_thousand_column_table_is_checked_by_a_fixed_number_of_expectations_that_name_the_bad_column():
    columns = {f"s{i:04d}": {"type": "numeric", "min": -1e6, "max": 1e6, "allowed": None, "max_null_fraction": 0.0}
               for i in range(1000)}
    rules = TableRules(columns=columns, label_column="label", key_column="id", min_rows=100, min_good=10,
                       min_anomalies=5, anomaly_ratio=(0.01, 0.2))
    first, second = _wide(400, 1000, 1, "batch-0001"), _wide(300, 1000, 2, "batch-0002")
    second["s0777"] = second["s0777"].astype(object)
    second.loc[12, "s0777"] = "err"                      # a sensor's export wrote an error code
    second.loc[40:80, "s0555"] = np.nan                  # one went silent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = validate_table(pd.concat([first, second], ignore_index=True), rules)
    assert not [w for w in caught if issubclass(w.category, pd.errors.PerformanceWarning)]
    assert not report.success and report.n_files == 700
    assert {f["column"] for f in report.failures} == {"s0777", "s0555"}
    [numbers] = [f for f in report.failures if f["expectation"] == "numbers"]
    assert numbers["offending_files"] == ["batch-0002-12"] and "(1 rows do not)" in numbers["description"]
    assert any(f["expectation"] == "nulls" and "in batch batch-0002 (41 of 300 rows are)" in f["description"]
               for f in report.failures)
    # GX ran one expectation per kind of check, not one per column
    assert len(report.gx_object.results) <= len(TABLE_CHECKS)
    # constant sensors are no drift: their unit falls back to the earlier batches' spread
    assert not [f for f in report.failures if f["expectation"] in ("mean", "quantiles")]


def _rules(**changes) -> TableRules:
    from tests.table_models import declared_columns

    columns = {name: {"type": "numeric", "min": None, "max": None, "allowed": None, "max_null_fraction": 0.0, **rule}
               for name, rule in declared_columns().items()}
    return TableRules(**{"columns": columns, "min_rows": 100, "min_good": 10, "min_anomalies": 5,
                         "anomaly_ratio": (0.01, 0.2), **changes})


def _snapshot(*batches: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([b.assign(batch=f"batch-{i + 1:04d}") for i, b in enumerate(batches)], ignore_index=True)


def test_a_key_repeated_far_outside_the_drift_window_is_refused_when_both_batches_train():
    nights = [generate_transactions(500, 8, f"batch-000{i}") for i in (1, 2, 3)]
    nights[2]["transaction_id"] = nights[0]["transaction_id"]  # night 3 replays night 1's ids
    report = validate_table(_snapshot(*nights), _rules(drift_window=1))  # key_window None: every batch trains
    [failure] = [f for f in report.failures if f["expectation"] == "key_unique"]
    assert "500 keys do: batch-0001 and batch-0003" in failure["description"]
    # only the newest batches train: the replay of a batch that no longer trains is history
    assert validate_table(_snapshot(*nights), _rules(drift_window=1, key_window=2)).success


def test_a_column_of_more_categories_than_the_statistics_keep_fails_its_category_check(monkeypatch):
    import components.table_stats as stats

    monkeypatch.setattr(stats, "MAX_CATEGORIES", 3)  # channel has 4 categories: past what is kept
    report = validate_table(_snapshot(generate_transactions(600, 9)), _rules())
    [failure] = [f for f in report.failures if f["column"] == "channel"]
    assert "'channel' has more than 3 distinct values in batch batch-0001" in failure["description"]
    assert not report.success


def test_a_newest_batch_without_a_single_number_in_a_column_is_drift_not_a_pass():
    first, second = generate_transactions(800, 10, "batch-0001"), generate_transactions(800, 10, "batch-0002")
    second["distance_from_home_km"] = np.nan  # the geolocation feed died; the column allows nulls
    rules = _rules()
    rules.columns["distance_from_home_km"]["max_null_fraction"] = 1.0
    report = validate_table(_snapshot(first, second), rules)
    assert [f["description"] for f in report.failures] == [
        "'distance_from_home_km' has not drifted: batch batch-0002 has no number in it to compare with batch "
        "batch-0001's (every value missing or not a number)"]


def test_a_wide_csv_streams_without_a_pandas_warning(tmp_path):
    frame = _wide(300, 800, 3, "batch-0001").drop(columns=["batch"])
    frame.to_csv(tmp_path / "export.csv", index=False)
    spec = StatsSpec({f"s{i:04d}": "numeric" for i in range(800)}, "id", "label")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = batch_stats("export", lambda: ((c, "export.csv") for c in iter_table_file(
            tmp_path / "export.csv", ("id",), spec.chunk_rows())), spec)
    assert stats.rows == 300 and len(stats.sample) == 300
    assert not [w for w in caught if issubclass(w.category, pd.errors.PerformanceWarning)]
