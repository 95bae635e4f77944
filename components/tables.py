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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
TABLE_SUFFIXES = (".csv", ".parquet")
OTHER = "__other__"
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

    for i, kind, s in zip(fraud, pattern, strength):
        label[i] = 1
        if kind == 0:  # card testing: small online charges in a burst
            category[i], channel[i], card_present[i] = "online", "online", 0.0
            blend(amount, i, rng.uniform(0.5, 8.0), s)
            count[i] = round((1 - s) * count[i] + s * rng.poisson(25.0))
            blend(hour, i, rng.uniform(0, 24), s)
        elif kind == 1:  # account takeover: new device, large purchase, at night
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


def _batch_files(folder: Path) -> list[tuple[str, Path]]:
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


def category_text(values: pd.Series) -> pd.Series:
    """Categories as text, whatever the file stored: a store id 7 (an int, or 7.0 in a float
    column that has blanks) is "7" in a CSV, a Parquet file and a client's frame alike; missing
    stays missing."""
    def text(value: Any) -> Any:
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, (bool, np.bool_)):
            return str(bool(value)).lower()
        return str(value)

    return pd.Series([text(v) for v in values.tolist()], index=values.index, dtype=object)


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
    for name in text_columns:
        if name in frame.columns:
            frame[name] = category_text(frame[name])
    return frame


def read_batches(folder: Path, text_columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Every batch file under ``folder`` as one frame with ``batch`` and ``source`` columns,
    and the files that could not be read (each with its reason). A file with no rows adds
    nothing (concatenated, its empty columns would turn every number column into text)."""
    frames, errors = [], []
    for batch, path in _batch_files(folder):
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


@dataclass(frozen=True)
class Transform:
    """Numeric: (x - mean) / std after filling nulls with the median; categorical: one-hot
    over the training categories plus ``other``. All statistics from the training rows."""
    numeric: dict[str, dict[str, float]]
    categorical: dict[str, list[str]]
    columns: tuple[str, ...]          # the feature columns in their declared order

    @classmethod
    def fit(cls, frame: pd.DataFrame, rules: dict[str, dict[str, Any]]) -> "Transform":
        numeric, categorical = {}, {}
        for name, rule in rules.items():
            if rule["type"] == "numeric":
                values = pd.to_numeric(frame[name], errors="coerce").astype(float)
                median = float(values.median()) if values.notna().any() else 0.0
                filled = values.fillna(median)
                std = float(filled.std(ddof=0))
                numeric[name] = {"median": median, "mean": float(filled.mean()), "std": std if std > 1e-12 else 1.0}
            else:
                categorical[name] = sorted(category_text(frame[name]).dropna().unique().tolist())
        return cls(numeric, categorical, tuple(rules))

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) + 1 for c in self.categorical.values())

    def feature_names(self) -> list[str]:
        names = []
        for name in self.columns:
            if name in self.numeric:
                names.append(name)
            else:
                names += [f"{name}={c}" for c in self.categorical[name]] + [f"{name}={OTHER}"]
        return names

    def apply(self, frame: pd.DataFrame) -> np.ndarray:
        """float32 rows x width. Values must already have the right types (see ``check_frame``).

        Every encoded value is a finite float32, or a ValueError names the column and the row
        (by the frame's index label: the position in a client's frame): a finite number far
        enough from the training values (amount=1e300) would overflow to infinity, and the
        networks would give it a NaN score instead of refusing it. This holds for every split
        preprocess encodes and for every frame the served model scores."""
        parts = []
        for name in self.columns:
            if name in self.numeric:
                stats = self.numeric[name]
                values = frame[name].astype(float).fillna(stats["median"]).to_numpy(np.float64)
                with np.errstate(over="ignore", invalid="ignore"):
                    encoded = (values - stats["mean"]) / stats["std"]
                    fits = np.isfinite(encoded.astype(np.float32))
                if not fits.all():
                    row = int(np.flatnonzero(~fits)[0])
                    many = int((~fits).sum())
                    raise ValueError(
                        f"column '{name}': row {row_name(frame, row)} holds {_shown(frame[name].iloc[row])}, too far "
                        f"from the training values to encode ((x - {stats['mean']:.6g}) / {stats['std']:.6g} "
                        f"overflows a float32); refused rather than scored as NaN"
                        + (f" ({many} rows in all)" if many > 1 else ""))
                parts.append(encoded[:, None])
            else:
                known = self.categorical[name]
                text = category_text(frame[name])
                codes = pd.Categorical(text, categories=known).codes
                unseen = text[(codes < 0) & text.notna().to_numpy()]
                if len(unseen):  # encoded as "other": say so, since the score cannot
                    shown = ", ".join(repr(v) for v in sorted(unseen.unique())[:5])
                    log.warning("%d of %d rows hold a '%s' category the training rows never had (%s%s): "
                                "encoded as the column's 'other' slot", len(unseen), len(frame), name, shown,
                                ", ..." if unseen.nunique() > 5 else "")
                onehot = np.zeros((len(frame), len(known) + 1))
                onehot[np.arange(len(frame)), np.where(codes < 0, len(known), codes)] = 1.0
                parts.append(onehot)
        if not parts:
            return np.zeros((len(frame), 0), np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def as_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical, "columns": list(self.columns)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transform":
        return cls(data["numeric"], data["categorical"], tuple(data["columns"]))


def _shown(value: Any) -> str:
    """A value as an error shows it: 1e+300, not np.float64(1e+300)."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return repr(value.item() if isinstance(value, np.generic) else value)


def row_name(frame: pd.DataFrame, position: int) -> str:
    """How an error names a row: its index label (its position in a client's frame, whose
    index is 0, 1, 2...; the record's key where pipeline score indexes a file's rows by it)."""
    return str(frame.index[position])


def check_frame(frame: Any, transform: Transform) -> pd.DataFrame:
    """The feature columns of ``frame`` with their types checked, or a ValueError that says
    which columns are missing or which column holds a value of the wrong type (and where)."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"input must be a DataFrame with the feature columns {', '.join(transform.columns)}; "
                         f"got {type(frame).__name__}")
    missing = [name for name in transform.columns if name not in frame.columns]
    if missing:
        raise ValueError(f"input is missing the feature column(s) {', '.join(missing)} "
                         f"(the model needs {', '.join(transform.columns)})")
    out = {}
    for name in transform.columns:
        column = frame[name]
        if name in transform.numeric:
            if pd.api.types.is_bool_dtype(column) or pd.api.types.is_numeric_dtype(column):
                converted = column.astype(float)
            else:
                converted = pd.to_numeric(column, errors="coerce").astype(float)
                bad = converted.isna() & column.notna()
                if bad.any():
                    row = bad.to_numpy().nonzero()[0][0]
                    raise ValueError(f"column '{name}' must be numeric; row {row_name(frame, row)} holds "
                                     f"{_shown(column.iloc[row])}")
            infinite = np.isinf(converted.to_numpy())
            if infinite.any():
                row = infinite.nonzero()[0][0]
                raise ValueError(f"column '{name}' must be a finite number; row {row_name(frame, row)} holds "
                                 f"{_shown(column.iloc[row])}")
            out[name] = converted
        else:
            out[name] = column  # any type: categories are compared as text (category_text)
    return pd.DataFrame(out, index=frame.index)
