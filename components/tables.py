"""Records (card transactions, machine telemetry) for ``data.kind: table``.

- ``generate_transactions``: a deterministic table of card transactions with a few percent
  of fraud in three patterns, for the demo and the tests (every row a pure function of
  (seed, batch, rows), as the image generator's batches are of their seed and spec).
- ``read_batches``: the landing snapshot's CSV and Parquet files as one frame, each row
  with its batch (the file's name, or its folder's for a folder of files).
- ``Transform``: the feature encoding that travels with the model: numeric columns
  imputed with the training median and standardised, categorical ones one-hot encoded over
  the categories of the training rows (anything else, a null too, lands in the column's
  ``other`` slot). It is fitted on the training split only and is a plain dict in the
  model's spec.json, so the served model encodes a frame exactly as training did.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.transform import category_text

log = logging.getLogger(__name__)
TABLE_SUFFIXES = (".csv", ".parquet")
# columns the pipeline adds to a snapshot; data columns of these names are refused (config.Table)
RESERVED = ("batch", "source", "is_anomaly", "is_normal", "labelled", "split", "sha256", "row")
MERCHANTS = ("grocery", "fuel", "restaurant", "online", "travel", "electronics", "pharmacy")
# median spend per merchant category, in the card's currency
MERCHANT_SPEND = {"grocery": 45.0, "fuel": 55.0, "restaurant": 35.0, "online": 40.0, "travel": 220.0,
                  "electronics": 150.0, "pharmacy": 25.0}
MERCHANT_SHARE = (0.28, 0.14, 0.16, 0.2, 0.05, 0.07, 0.1)
# how often a card holder pays a merchant of this category online (card not present)
ONLINE_SHARE = {"grocery": 0.03, "fuel": 0.0, "restaurant": 0.05, "online": 1.0, "travel": 0.45,
                "electronics": 0.35, "pharmacy": 0.05}


def generate_transactions(rows: int, seed: int = 0, batch: str = "batch-0001", fraud_rate: float = 0.04,
                          missing_distance: float = 0.01) -> pd.DataFrame:
    """``rows`` card transactions of one nightly batch; ``fraud_rate`` of them fraud (label 1).

    Normal spending follows the merchant's typical amount (log-normal), daytime hours, short
    distances from home, a known device, a handful of transactions a day. Fraud comes in
    three patterns: card testing (bursts of small online charges), account takeover (a new
    device, large online electronics or travel purchases at night) and a cloned card (card
    present, far from home, at unusual hours). Each fraud has a strength between the card
    holder's normal behaviour and the pattern's, so weak ones are hard to tell from normal,
    and every fraud row is a combination normal rows have too (whole transaction counts, a
    channel that fits the merchant): no one value gives it away. A few distances are missing
    (no geolocation).
    """
    rng = np.random.default_rng([seed, int(hashlib.sha256(batch.encode()).hexdigest()[:8], 16)])
    n_fraud = int(round(rows * fraud_rate))
    merchant = rng.choice(len(MERCHANTS), size=rows, p=MERCHANT_SHARE)
    category = np.array(MERCHANTS)[merchant]
    amount = np.array([MERCHANT_SPEND[c] for c in category]) * rng.lognormal(0.0, 0.6, rows)
    hour = np.clip(rng.normal(14.0, 4.0, rows), 0, 23.99)
    distance = rng.lognormal(1.5, 1.0, rows)
    device_changed = (rng.random(rows) < 0.03).astype(float)
    online = rng.random(rows) < np.array([ONLINE_SHARE[c] for c in category])
    card_present = np.where(online, 0.0, 1.0)
    channel = np.where(online, "online", rng.choice(["chip", "contactless", "swipe"], size=rows, p=[0.5, 0.42, 0.08]))
    count = rng.poisson(3.0, rows).astype(float)
    label = np.zeros(rows, dtype=np.int64)

    fraud = rng.choice(rows, size=n_fraud, replace=False)
    pattern = rng.integers(0, 3, size=n_fraud)
    # how far each fraud departs from the card's normal behaviour: a careful fraudster (low
    # strength) looks much like the card holder, so some fraud is hard to tell from normal
    strength = rng.beta(2.0, 1.5, size=n_fraud)

    def blend(values: np.ndarray, i: int, target: float, s: float) -> None:
        values[i] = (1 - s) * values[i] + s * target

    for i, scheme, s in zip(fraud, pattern, strength):
        label[i] = 1
        if scheme == 0:  # card testing: small online charges in a burst
            category[i], channel[i], card_present[i] = "online", "online", 0.0
            blend(amount, i, rng.uniform(0.5, 8.0), s)
            count[i] = round((1 - s) * count[i] + s * rng.poisson(25.0))
            blend(hour, i, rng.uniform(0, 24), s)
        elif scheme == 1:  # account takeover: new device, large purchase, at night
            category[i] = rng.choice(["electronics", "travel", "online"])
            channel[i], card_present[i] = "online", 0.0
            device_changed[i] = 1.0 if rng.random() < 0.3 + 0.6 * s else 0.0
            blend(amount, i, MERCHANT_SPEND[category[i]] * rng.lognormal(1.6, 0.5), s)
            blend(hour, i, rng.uniform(0, 6), s)
        else:  # a cloned card: present, far from home, at an unusual hour
            channel[i], card_present[i] = rng.choice(["swipe", "chip"], p=[0.7, 0.3]), 1.0
            if category[i] == "online":  # a card in hand pays at a shop
                category[i] = rng.choice(["electronics", "fuel", "grocery", "restaurant"])
            blend(distance, i, rng.lognormal(6.0, 0.8), s)
            blend(hour, i, rng.normal(3.0, 2.5) % 24, s)
            amount[i] *= 1.0 + s * rng.uniform(0.0, 2.0)
    distance[rng.random(rows) < missing_distance] = np.nan
    return pd.DataFrame({
        "transaction_id": [f"{batch}-{i:07d}" for i in range(rows)],
        "amount": np.round(amount, 2), "hour": np.round(hour, 2), "merchant_category": category,
        "distance_from_home_km": np.round(distance, 2), "device_changed": device_changed,
        "card_present": card_present, "transactions_last_24h": count, "channel": channel,
        "is_fraud": label,
    })


def batch_files(folder: Path) -> list[tuple[str, Path]]:
    """(batch, file): a file directly in ``folder`` is its own batch (its name without the
    suffix); files in a sub-folder belong to that folder's batch. Hidden files and those whose
    name starts with ``_`` (Spark's ``_SUCCESS``, as pyarrow skips them) are not data."""
    out = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith((".", "_")) for part in relative.parts):
            continue
        batch = relative.parts[0] if len(relative.parts) > 1 else path.stem
        out.append((batch, path))
    return out


CHUNK_ROWS = 100_000  # rows per chunk when a file is streamed (iter_table_file)


def _text(frame: pd.DataFrame, text_columns: tuple[str, ...]) -> pd.DataFrame:
    for name in text_columns:
        if name in frame.columns:
            frame[name] = category_text(frame[name])
    return frame


def iter_table_file(path: Path, text_columns: tuple[str, ...] = (), chunk_rows: int = CHUNK_ROWS,
                    columns: list[str] | None = None):
    """One CSV or Parquet file as frames of at most ``chunk_rows`` rows each, read as
    ``read_table_file`` reads it: memory bounded by the chunk, not the file (a fraud team's
    night is millions of rows). Parquet is read by record batch (pyarrow), CSV by pandas'
    chunked reader; ``columns`` (Parquet only) reads those columns alone. A ValueError names
    the file when it cannot be read, also one that breaks half way."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path.name}: not a CSV or Parquet file ({suffix or 'no extension'})")
    try:
        if suffix == ".csv":
            with pd.read_csv(path, dtype={name: str for name in text_columns}, chunksize=chunk_rows) as reader:
                for chunk in reader:
                    yield _text(chunk, text_columns)
        else:
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as parquet:
                present = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
                empty = True
                for record_batch in parquet.iter_batches(batch_size=chunk_rows, columns=present):
                    empty = False
                    yield _text(record_batch.to_pandas(), text_columns)
                if empty:  # a file of no rows still has its columns
                    yield _text(parquet.schema_arrow.empty_table().to_pandas(), text_columns)
    except ValueError as error:
        if str(error).startswith(path.name):
            raise
        raise ValueError(f"{path.name}: cannot be read as {suffix[1:].upper()}: {error}") from None
    except Exception as error:
        raise ValueError(f"{path.name}: cannot be read as {suffix[1:].upper()}: {error}") from None


def read_table_file(path: Path, text_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """One CSV or Parquet file, ``text_columns`` (the categorical ones and the key) read as
    text; a ValueError names the file when it cannot be read."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path.name}: not a CSV or Parquet file ({suffix or 'no extension'})")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype={name: str for name in text_columns})
        else:
            frame = pd.read_parquet(path)
    except Exception as error:
        raise ValueError(f"{path.name}: cannot be read as {suffix[1:].upper()}: {error}") from None
    return _text(frame, text_columns)


def read_batches(folder: Path, text_columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Every batch file under ``folder`` as one frame with ``batch`` and ``source`` columns,
    and the files that could not be read (each with its reason). A file with no rows adds
    nothing (concatenated, its empty columns would turn every number column into text)."""
    frames, errors = [], []
    for batch, path in batch_files(folder):
        try:
            frame = read_table_file(path, text_columns)
        except ValueError as error:
            errors.append(str(error))
            continue
        clash = [name for name in ("batch", "source") if name in frame.columns]
        if clash:
            errors.append(f"{path.name}: has a column named {', '.join(clash)}, which the pipeline adds itself")
            continue
        if frame.empty:
            continue
        frame.insert(0, "source", path.relative_to(folder).as_posix())
        frame.insert(0, "batch", batch)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["batch", "source"]), errors
    return pd.concat(frames, ignore_index=True), errors


def key_hash(key: Any) -> str:
    return hashlib.sha256(str(key).encode()).hexdigest()


