"""What differs between the kinds of data the pipeline learns from: one module per kind.

The stages, the CLI and ``pipeline score`` ask the kind (``kind_of(config)``) instead of
branching on ``data.kind``: how items are found and validated, how they become the rows a
model trains on, what the served model's input looks like (its example and signature), how
files are scored, and what one item is called. A new kind (video frames, time series) is a
new module here with a ``DataKind`` subclass, its name in ``KINDS`` and in ``Data.kind``'s
choices (pipeline/config.py); nothing else changes.

Every method takes the typed config or the Layout, never params.yaml; heavy libraries are
imported inside the methods (the DAG files import the config, and the CLI starts fast).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.config import Config
    from pipeline.layout import Layout

# data.kind -> "module:class"
KINDS = {"image": "pipeline.kinds.image:ImageKind", "table": "pipeline.kinds.table:TableKind"}
# data.kind -> the model.type values it can train: the config refuses any other (check_config),
# and the trigger form offers only these. Here, not in the kind's module, so that the form can
# ask while Airflow parses the DAG file without importing numpy and Pillow (pipeline/trigger_form.py).
MODEL_TYPES = {"image": ("autoencoder", "deep_sad", "classifier", "patchcore", "padim"),
               "table": ("autoencoder", "deep_sad", "classifier")}  # patchcore, padim: a pretrained image backbone


class DataKind:
    """The interface every kind implements (each method says what the stages expect)."""

    name: str = ""
    unit: str = "items"        # what one item is called in messages: "images", "rows"
    landing_files: str = ""    # what lands in data.landing, in messages: "images", "CSV/Parquet files"
    score_suffixes: frozenset[str] = frozenset()  # the files ``pipeline score`` reads

    @property
    def model_types(self) -> tuple[str, ...]:
        """The model.type values this kind can train (``MODEL_TYPES``)."""
        return MODEL_TYPES[self.name]

    def check_config(self, config: Config) -> None:
        """Refuse (ValueError, naming the key) settings this kind cannot run with."""

    def has_data(self, landing: Path) -> bool:
        """Whether the landing folder holds a batch already (generate-data --if-empty)."""
        raise NotImplementedError

    def generate(self, landing: Path, batch: str, seed: int, options: Any) -> str:
        """Write one synthetic batch (``options``: generate-data's arguments); says what it wrote."""
        raise NotImplementedError

    def validate(self, layout: Layout) -> tuple[pd.DataFrame | None, Any]:
        """The manifest of the snapshot (one row per item, with its split and sha256) and the
        validation report (components.validation.ValidationReport); no manifest if it failed."""
        raise NotImplementedError

    def preprocess(self, layout: Layout) -> dict:
        """Write processed/: each split's rows (``items_file``) and index.parquet, whole or not at
        all; returns each split's counts."""
        raise NotImplementedError

    def items_file(self, processed: Path, split: str) -> Path:
        """The .npy of a split's model inputs inside ``processed``."""
        raise NotImplementedError

    def model_spec(self, layout: Layout) -> dict:
        """The network's spec (detector.networks.build's argument) for config.model."""
        raise NotImplementedError

    def served_spec(self, layout: Layout, spec: dict) -> dict:
        """spec.json as train writes it: what the served model needs besides its weights."""
        raise NotImplementedError

    def serving_limits(self, config: Config) -> dict:
        """What register adds to spec.json from settings train does not depend on (the decoding
        limits an image model enforces when it serves)."""
        return {}

    def test_inputs(self, layout: Layout) -> tuple[pd.DataFrame, np.ndarray]:
        """The test split as a client would send it to the served model, and its labels, in row order."""
        raise NotImplementedError

    def example(self, layout: Layout, test: pd.DataFrame, spec: dict) -> pd.DataFrame:
        """The input example logged with the model (a few items of ``test``)."""
        raise NotImplementedError

    def signature(self, meta: dict):
        """The served model's MLflow signature, from its spec.json (``meta``)."""
        raise NotImplementedError

    def score_files(self, layout: Layout, model, files: list[Path], root: Path, heatmaps: bool = False,
                    map_dir: Path | None = None) -> pd.DataFrame:
        """``pipeline score``: one row per item of ``files`` (relative to ``root``), with its score,
        flag and, for what could not be scored, the reason."""
        raise NotImplementedError


def test_rows(layout: Layout) -> tuple[pd.DataFrame, np.ndarray]:
    """The test split's rows of processed/index.parquet in row order, and their labels: what
    every kind's ``test_inputs`` turns into a client's frame."""
    import numpy as np
    import pandas as pd

    index = pd.read_parquet(layout.index)
    test = index[index["split"] == "test"].sort_values("row")
    return test, test["is_anomaly"].to_numpy(np.int64)


def kind_named(name: str) -> DataKind:
    if name not in KINDS:
        raise ValueError(f"unknown data.kind {name!r} (known: {', '.join(KINDS)})")
    module, cls = KINDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def kind_of(config: Config) -> DataKind:
    return kind_named(config.data.kind)
