"""The served model: an MLflow pyfunc that takes encoded images (or, for data.kind table,
records) and returns scores and flags.

For tables the input DataFrame holds the feature columns its signature names; a missing
column, a value of the wrong type, or a number too far from the training values to encode
(amount=1e300 overflows float32) is refused with an error that names the column and the row.

Contract (docs/serving.md): input DataFrame with column ``image`` holding PNG/JPEG
bytes (base64 text is accepted too, as JSON clients send it); output DataFrame with
``anomaly_score`` (float, higher = more anomalous), ``is_anomaly`` (bool, score >
the calibrated threshold, or a score that is not a finite number: see ``is_anomalous``) and
``p_value`` (the conformal p-value of the score among the normal calibration items the model
carries, detector/conformal.py: for a normal item P(p_value <= a) <= a; a model registered
before p-values has no ``p_value`` column); for patchcore and padim, on request
(``params={"anomaly_map": True}``), ``anomaly_map`` too. The ``detector`` package travels with the model as
code, so a consumer needs neither this repository nor its params. The decoding
limits the model was trained with (``decode_limits`` in its spec.json) apply when it
scores, so a served model refuses a decompression bomb or an oversized upload too.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from detector.scoring import is_anomalous

INPUT_COLUMN = "image"
SCORE_BATCH = 128


def _as_bytes(value: Any, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: column '{INPUT_COLUMN}' holds text that is not base64") from None
    raise ValueError(f"row {row}: column '{INPUT_COLUMN}' must hold encoded image bytes, got {type(value).__name__}")


def _flag(params: dict | None, name: str) -> bool:
    """A boolean request parameter; anything but a boolean (or its text) is refused by name."""
    value = (params or {}).get(name, False)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
    return bool(value)


class AnomalyDetector(mlflow.pyfunc.PythonModel):
    """Loads weights + spec from the model's artifacts; scores in batches."""

    normals = None  # the calibration normals' sorted scores, when the model carries them (p_value)

    def load_context(self, context) -> None:
        import torch

        from detector.decode import DecodeLimits
        from detector.networks import build

        meta = json.loads(Path(context.artifacts["spec"]).read_text())
        self.spec = meta["spec"]
        self.threshold = float(meta["threshold"])
        self.transform = None
        if meta.get("kind") == "table":
            from detector.transform import Transform

            self.transform = Transform.from_dict(meta["transform"])
        else:
            self.image_size = int(meta["image_size"])
            self.channels = int(meta["channels"])
            self.limits = DecodeLimits.from_dict(meta.get("decode_limits"))  # absent: the safe defaults
        normals = context.artifacts.get("calibration_normals")
        self.normals = np.load(normals, allow_pickle=False) if normals else None
        self.model = build(self.spec)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Scores and flags; with ``params={"anomaly_map": True}`` (patchcore, padim) also
        ``anomaly_map``: a PNG per image, grey, 128 = the threshold (detector/heatmaps.py).
        Without it the maps are not computed, so the default path costs nothing more."""
        from detector.decode import ImageDecodeError, decode_to_array
        from detector.scoring import score, score_and_maps

        want_map = _flag(params, "anomaly_map")
        if self.transform is not None:
            if want_map:
                raise ValueError("anomaly_map: a table model has no anomaly map")
            return self._predict_rows(model_input)
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"input must be a DataFrame with a column '{INPUT_COLUMN}' of encoded PNG/JPEG bytes")
        arrays = []
        for row, value in enumerate(model_input[INPUT_COLUMN].tolist()):
            try:
                arrays.append(decode_to_array(_as_bytes(value, row), self.image_size, self.channels,
                                              self.limits))
            except ImageDecodeError as error:
                raise ValueError(f"row {row}: {error}") from None
        images = np.stack(arrays) if arrays else np.zeros((0, self.channels, self.image_size, self.image_size),
                                                           np.uint8)
        if want_map:
            from detector.heatmaps import encode_png

            scores, maps = score_and_maps(self.model, images, batch_size=SCORE_BATCH, device="cpu")
            encoded = [encode_png(m, self.threshold) for m in maps]
        else:
            scores = score(self.model, images, batch_size=SCORE_BATCH, device="cpu")
        out = self._frame(scores, model_input.index)
        if want_map:
            out["anomaly_map"] = encoded
        return out

    def _predict_rows(self, model_input) -> pd.DataFrame:
        """data.kind table: the feature columns (others are ignored), checked, then encoded
        as in training; a missing column, a value of the wrong type or one that does not fit
        the encoding is refused by column and row (the row by its index label)."""
        from detector.transform import check_frame
        from detector.scoring import score

        frame = check_frame(model_input, self.transform)
        rows = self.transform.apply(frame)
        scores = score(self.model, rows, batch_size=4096, device="cpu") if len(rows) else np.zeros(0)
        return self._frame(scores, model_input.index)

    def _frame(self, scores: np.ndarray, index) -> pd.DataFrame:
        """The output columns every kind returns: score, flag and, when the model carries its
        calibration normals, the p-value."""
        from detector.conformal import p_values

        scores = np.asarray(scores, dtype=np.float64)
        out = pd.DataFrame({"anomaly_score": scores, "is_anomaly": is_anomalous(scores, self.threshold)}, index=index)
        if self.normals is not None:
            out["p_value"] = p_values(scores, self.normals)
        return out


SCORE_CHUNK = 256


def score_frame(model, inputs: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
    """A served model's predictions for ``inputs`` (a client's frame), a chunk at a time;
    ``params`` go to its predict (``{"anomaly_map": True}``)."""
    parts = [model.predict(inputs.iloc[i:i + SCORE_CHUNK].reset_index(drop=True), **({"params": params} if params
                                                                                      else {}))
             for i in range(0, len(inputs), SCORE_CHUNK)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["anomaly_score", "is_anomaly"])


def score_bytes(model, images: list[bytes], params: dict | None = None) -> pd.DataFrame:
    return score_frame(model, pd.DataFrame({"image": images}), params)
