"""The table transform a table model encodes its records with (fitted on the training rows,
stored in the model's spec.json), and the check of a client's frame before it is encoded."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


OTHER = "__other__"


def category_text(values: pd.Series) -> pd.Series:
    """Categories as text, whatever the file stored: a store id 7 (an int, or 7.0 in a float
    column that has blanks) is "7" in a CSV, a Parquet file and a client's frame alike; missing
    stays missing."""
    def text(value: Any) -> Any:
        if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)) or value is pd.NA:
            return None
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return str(int(value))
        if isinstance(value, (bool, np.bool_)):
            return str(bool(value)).lower()
        return str(value)

    if pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):  # text already: no per-value work
        out = values.astype(object)
        return out.where(values.notna().to_numpy(), None)
    return pd.Series([text(v) for v in values.tolist()], index=values.index, dtype=object)


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
