"""score_table_files reads a CSV/Parquet file in chunks (components.tables.iter_table_file), so
a file of millions of rows needs memory for one chunk's features, not the file's. Scored by a
real served table model (a pyfunc logged to a local sqlite store, as the pipeline logs it),
chunked scoring must give the table a single chunk gives, row for row; a file refused at a
later chunk gets one error row and none of its rows; rows without a key are numbered on
across chunks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.table_models import declared_columns, served_table_model

KEY = "transaction_id"
TEXT = (KEY, "merchant_category", "channel")
WHOLE = 10**9  # rows per chunk that no test file reaches: one chunk, as the file read whole


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small deep_sad table model with calibration normals (so it gives p-values), logged,
    registered and loaded as a pyfunc."""
    return served_table_model(tmp_path_factory.mktemp("chunked"), "chunked", rows=600, seed=31, width=8, epochs=1,
                              calibration_rows=300, threshold=lambda normals: float(np.median(normals)))


def _transactions(rows: int, seed: int) -> pd.DataFrame:
    from components.tables import generate_transactions

    return generate_transactions(rows, seed, batch=f"night-{seed}", fraud_rate=0.1)


def _chunks(path: Path, rows: int) -> int:
    from components.tables import iter_table_file

    return sum(1 for _ in iter_table_file(path, TEXT, chunk_rows=rows))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_chunked_scoring_gives_the_table_of_a_single_chunk(served, tmp_path, suffix):
    from pipeline.score import score_table_files

    rows = _transactions(1000, 40)
    assert rows["distance_from_home_km"].isna().any()  # blanks: a chunk's column may read as int, another's float
    path = tmp_path / f"night{suffix}"
    rows.to_csv(path, index=False) if suffix == ".csv" else rows.to_parquet(path, index=False)
    assert _chunks(path, 97) == 11 and _chunks(path, WHOLE) == 1

    whole = score_table_files(served, [path], tmp_path, KEY, TEXT, chunk_rows=WHOLE)
    chunked = score_table_files(served, [path], tmp_path, KEY, TEXT, chunk_rows=97)
    assert list(whole.columns) == ["file", "row", "anomaly_score", "is_anomaly", "error", "p_value"]
    assert whole["row"].tolist() == rows[KEY].astype(str).tolist() and (whole["error"] == "").all()
    # identical here bit for bit; the floats to float32's precision all the same, as a BLAS may
    # reduce a batch of another size in another order (file, row, flags, error and dtypes exactly)
    pd.testing.assert_frame_equal(chunked, whole, check_exact=False, rtol=1e-6, atol=1e-9)
    assert chunked["is_anomaly"].tolist() == whole["is_anomaly"].tolist()
    assert chunked.dtypes.to_dict() == whole.dtypes.to_dict()
    # and the model's own scores for the whole frame
    direct = served.predict(rows[list(declared_columns())])
    np.testing.assert_allclose(chunked["anomaly_score"], direct["anomaly_score"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_bad_value_in_a_later_chunk_gives_one_error_row_and_none_of_the_files_rows(served, tmp_path, monkeypatch,
                                                                                      suffix):
    import components.tables
    from pipeline.score import score_table_files

    monkeypatch.setattr(components.tables, "CHUNK_ROWS", 100)  # the default the scorer takes
    good, bad = _transactions(250, 41), _transactions(500, 42)
    bad["amount"] = bad["amount"].astype(object if suffix == ".csv" else float)
    bad.loc[430, "amount"] = "lots" if suffix == ".csv" else float("inf")  # the fifth chunk of five
    good.to_csv(tmp_path / "good.csv", index=False)
    target = tmp_path / f"bad{suffix}"
    bad.to_csv(target, index=False) if suffix == ".csv" else bad.to_parquet(target, index=False)
    assert _chunks(target, 100) == 5

    table = score_table_files(served, [target, tmp_path / "good.csv"], tmp_path, KEY, TEXT)
    refused = table[table["file"] == target.name]
    assert len(refused) == 1, refused
    reason = refused["error"].iloc[0]
    assert "'amount'" in reason and str(bad.loc[430, KEY]) in reason, reason  # the record named by its key
    assert np.isnan(refused["anomaly_score"].iloc[0]) and bool(refused["is_anomaly"].iloc[0])
    scored = table[table["file"] == "good.csv"]
    assert scored["row"].tolist() == good[KEY].astype(str).tolist() and (scored["error"] == "").all()
    assert np.isfinite(scored["anomaly_score"]).all()


def test_rows_without_a_key_are_numbered_on_across_chunks(served, tmp_path):
    from pipeline.score import score_table_files

    rows = _transactions(350, 43).drop(columns=[KEY])
    rows.to_csv(tmp_path / "nokey.csv", index=False)
    rows.to_parquet(tmp_path / "nokey.parquet", index=False)
    files = [tmp_path / "nokey.csv", tmp_path / "nokey.parquet"]

    chunked = score_table_files(served, files, tmp_path, KEY, TEXT, chunk_rows=100)
    numbers = [str(n) for n in range(350)]
    assert chunked["row"].tolist() == numbers + numbers
    pd.testing.assert_frame_equal(chunked, score_table_files(served, files, tmp_path, KEY, TEXT, chunk_rows=WHOLE),
                                  check_exact=False, rtol=1e-6, atol=1e-9)


def test_empty_files_and_a_missing_column_are_refused_as_when_read_whole(served, tmp_path):
    from pipeline.score import score_table_files

    (tmp_path / "empty.csv").write_text("")  # not even a header: refused
    rows = _transactions(120, 44)
    rows.head(0).to_csv(tmp_path / "header.csv", index=False)  # no records: nothing to score, nothing wrong
    # Parquet is read for the model's columns and the key alone: a missing one is still named
    rows.drop(columns=["amount"]).to_parquet(tmp_path / "no_amount.parquet", index=False)
    table = score_table_files(served, [tmp_path / n for n in ("empty.csv", "header.csv", "no_amount.parquet")],
                              tmp_path, KEY, TEXT, chunk_rows=50)
    assert table["file"].tolist() == ["empty.csv", "no_amount.parquet"]
    errors = dict(zip(table["file"], table["error"]))
    assert errors["empty.csv"] == "empty.csv: cannot be read as CSV: No columns to parse from file"
    assert errors["no_amount.parquet"].startswith("Model is missing inputs ['amount']."), errors
