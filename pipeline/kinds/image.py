"""Images: a batch folder whose subfolders are labels (``good/`` is normal), PNG or JPEG files,
decoded with the limits the served model keeps (detector/decode.py).

preprocess decodes, converts and resizes each image once into uint8 arrays, one .npy per split,
through the decoded-image cache (pipeline/decoded_cache.py). The whole output folder is written under a temporary name and renamed into place
only when every file in it is complete, so a stage that runs out of disk (or finds
its folder unwritable) leaves nothing under the name the next stage reads; the error
says which file, and why, in one line. Rows are written through a small buffer, not a
memory map of the whole array, so the stage's memory does not grow with the image count.
"""
from __future__ import annotations

import errno
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.images import content_hash, discover
from detector.decode import DecodeLimits, ImageDecodeError, decode_to_array
from pipeline.config import Config
from pipeline.decoded_cache import WRITE_FAILURES, DecodedCache, Rows, PackWriter, cache_folder, compact
from pipeline.io import DataError, StageError, atomic_path
from pipeline.kinds import DataKind, test_rows
from pipeline.layout import SPLITS, Layout

if TYPE_CHECKING:
    import pyarrow as pa

INDEX_COLUMNS = ("path", "batch", "label", "is_anomaly", "sha256", "split")  # processed/index.parquet, with "row"


def decode_limits(config: Config) -> DecodeLimits:
    """The decoding limits of params (preprocess.max_pixels, preprocess.max_bytes, and the
    formats validation allows, validate.allowed_formats): validate, preprocess and the served
    model (its spec.json's decode_limits) decode the same formats and no other."""
    return DecodeLimits(max_pixels=config.preprocess.max_pixels, max_bytes=config.preprocess.max_bytes,
                        formats=tuple(config.validation.allowed_formats))


def _write_split(target: Path, rows: dict[str, list], raw: Path, shape: tuple[int, ...], limits: DecodeLimits,
                 cache: DecodedCache, writer: PackWriter | None, counts: dict[str, int]) -> None:
    channels, size = shape[0], shape[1]
    out = Rows(target, len(rows["path"]), shape)
    try:
        for relpath, key in zip(rows["path"], rows["sha256"]):
            row = cache.read(key)
            if row is not None:
                counts["from_cache"] += 1
            else:
                path = raw / relpath
                try:
                    data = path.read_bytes()
                except OSError as error:
                    raise StageError(f"preprocess: cannot read {path}: {error.strerror or error}") from error
                if content_hash(data).encode() != key:  # only bytes validate checked may reach training
                    raise DataError(f"preprocess: {path} changed since validate checked it (its sha256 differs "
                                    "from the manifest's); run the pipeline again from ingest")
                try:
                    row = decode_to_array(data, size, channels, limits)
                except ImageDecodeError as error:  # validation passed it under other limits
                    raise DataError(f"preprocess: {path}: {error}") from None
                counts["decoded"] += 1
                if writer is not None:
                    writer.put(key, row)
            out.put(row)
    except BaseException:
        out.discard()
        raise
    out.close()


def _cannot_write(error: OSError, layout: Layout, writing: Path) -> StageError:
    def shown(path: Path) -> str:
        try:
            return Path(path).relative_to(layout.root).as_posix()
        except ValueError:
            return str(path)

    why = WRITE_FAILURES[error.errno]
    fix = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
    return StageError(f"preprocess: cannot write {shown(writing)}: {why} ([Errno {error.errno}] {error.strerror}"
                      f"{': ' + shown(error.filename) if error.filename else ''}); nothing was written under "
                      f"{shown(layout.processed)}; {fix}, then run the stage again")


def _int64(values) -> pa.Array:
    """An Arrow int64 array straight from numpy's buffer: pa.array() would import pandas."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _manifest_rows(layout: Layout) -> tuple[pa.Table, dict[str, dict[str, list]]]:
    """The decodable rows of the validated manifest: the index to write (split by split, each
    sorted by path, numbered by ``row`` within its split), and each split's paths, hashes (as
    bytes: the cache's keys) and labels as Python lists.

    pyarrow without pandas, and without the calls that import it (read_table, pa.array,
    pa.table): pandas' import alone (0.4 s here) was a fifth of a nightly preprocess that
    decodes only the new images (benchmarks/incremental.py)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(layout.manifest) as manifest:
        table = manifest.read(columns=[*INDEX_COLUMNS, "decode_ok"])
    # Python objects for these columns only (each costs ~100 bytes a row); not to_numpy: it imports pandas
    columns = {name: table.column(name).to_pylist() for name in ("path", "is_anomaly", "split", "decode_ok")}
    columns["sha256"] = [digest.encode() for digest in table.column("sha256").to_pylist()]
    order = sorted((i for i, ok in enumerate(columns["decode_ok"]) if ok), key=columns["path"].__getitem__)
    taken, rows, split_rows = [], [], {}
    for split in SPLITS:
        chosen = [i for i in order if columns["split"][i] == split]
        if not chosen:
            raise StageError(f"the {split} split is empty: add images or change preprocess.split")
        split_rows[split] = {column: [columns[column][i] for i in chosen] for column in ("path", "sha256", "is_anomaly")}
        taken += chosen
        rows.append(np.arange(len(chosen)))
    index = table.select(list(INDEX_COLUMNS)).take(_int64(taken)).replace_schema_metadata(None)
    return index.append_column("row", _int64(np.concatenate(rows))), split_rows


def _preprocess(layout: Layout) -> dict:
    import pyarrow.parquet as pq

    config = layout.config
    size, channels = config.preprocess.image_size, config.preprocess.channels
    shape = (channels, size, size)
    limits = decode_limits(config)
    index, split_rows = _manifest_rows(layout)
    cache = DecodedCache.open(cache_folder(layout, size, channels, limits), shape)
    missing = {key for rows in split_rows.values() for key in rows["sha256"] if not cache.has(key)}
    writer = PackWriter(cache.folder, missing, shape) if cache.folder is not None and missing else None
    published = False
    counts = {}
    decoding = {"decoded": 0, "from_cache": 0}
    writing = layout.processed
    try:
        with atomic_path(layout.processed) as staging:
            staging.mkdir()
            for split, rows in split_rows.items():
                writing = layout.split_items(split)
                _write_split(staging / writing.relative_to(layout.processed), rows, layout.raw, shape, limits,
                             cache, writer, decoding)
                counts[split] = {"items": len(rows["path"]), "anomalies": sum(rows["is_anomaly"])}
            if writer is not None:  # every row is decoded: kept even if the index cannot be written
                published, writer = writer.finish(), None
            writing = layout.index
            buffer = io.BytesIO()  # Python's own write below raises an OSError with its errno
            pq.write_table(index, buffer)
            (staging / writing.relative_to(layout.processed)).write_bytes(buffer.getvalue())
            writing = layout.processed
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise _cannot_write(error, layout, writing) from error
    finally:
        if writer is not None:  # the stage failed before every row was decoded
            writer.abandon(RuntimeError("the stage failed"), quiet=True)
        cache.close()
    if published:
        compact(cache.folder, shape)
    counts.update(decoding)
    print("preprocess: " + ", ".join(f"{s} {counts[s]['items']} ({counts[s]['anomalies']} anomalies)"
                                     for s in SPLITS)
          + f" at {channels}x{size}x{size}; decoded {decoding['decoded']}, from the cache {decoding['from_cache']}")
    return counts


def rules_from(config: Config):
    from components.validation import Rules

    v = config.validation
    return Rules(
        extensions=tuple(config.data.extensions), allowed_formats=tuple(v.allowed_formats),
        allowed_modes=tuple(v.allowed_modes),
        allowed_labels=tuple(v.allowed_labels) if v.allowed_labels is not None else None,
        min_good=v.min_good, min_anomalies=v.min_anomalies, anomaly_ratio=tuple(v.anomaly_ratio),
        min_side=v.min_side, max_side=v.max_side, min_std=v.min_std, uniform_geometry=v.uniform_geometry,
    )


def _example_png(data: bytes, size: int, formats: list[str]) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=formats) as image:  # validate.allowed_formats, as everywhere
        small = image.convert("RGB").resize((size, size))
        buffer = io.BytesIO()
        small.save(buffer, format="PNG")
        return buffer.getvalue()


DRIFT_MAX_ITEMS = 300  # normal images a side, drawn at random: the test stays exact, and cheap
DRIFT_SEED = 0         # the draw's and the permutations' seed: the same snapshot gives the same p-value


def _drift(layout: Layout, manifest) -> dict | None:
    """validate.drift: have the normal images of the newest batch (the last by name, as ingest's
    batch-NNNN sort) moved away from those of the earlier batches? A permutation MMD test
    (components/drift.py) in components/image_features.py's feature space.

    Anomalies are left out: their share changes from night to night by design. A statistic or
    p-value that is not a number is an error of the check, never "no drift"."""
    import math
    import time

    from components.drift import mmd_test
    from components.image_features import SIZE, embed_pair, feature_space

    config = layout.config
    setting, level = config.validation.drift, config.validation.drift_level
    if setting == "off":
        return None
    started = time.perf_counter()
    batches = sorted(manifest["batch"].astype(str).unique()) if not manifest.empty else []
    if len(batches) < 2:
        return {"setting": setting, "tested": False, "refused": False, "message": "no earlier batch: drift not tested"}
    newest = batches[-1]
    normal = manifest[manifest["is_normal"].astype(bool) & manifest["decode_ok"].astype(bool)]
    sides = [normal.loc[normal["batch"].astype(str) != newest, "path"].tolist(),
             normal.loc[normal["batch"].astype(str) == newest, "path"].tolist()]
    if min(len(side) for side in sides) < 2:
        return {"setting": setting, "tested": False, "refused": False, "message":
                f"drift not tested: the test needs 2 normal images a side; batch {newest} has {len(sides[1])}, "
                f"the earlier batches {len(sides[0])}"}
    rng = np.random.default_rng(DRIFT_SEED)
    space = feature_space(config.model.type, config.model.backbone, config.model.backbone_weights,
                          config.model.layers)
    limits, channels = decode_limits(config), config.preprocess.channels
    images = []
    for paths in sides:
        chosen = sorted(rng.choice(paths, min(len(paths), DRIFT_MAX_ITEMS), replace=False))
        try:
            images.append(np.stack([decode_to_array((layout.raw / path).read_bytes(), SIZE, channels, limits)
                                    for path in chosen]))
        except (OSError, ImageDecodeError) as error:  # validation's own decode passed them a moment ago
            raise DataError(f"validate: the drift test cannot read an image it checked: {error}") from None
    features = embed_pair(*images, space)
    # the smallest p-value a permutation test can give is 1 / (1 + permutations): well below the level
    permutations = max(499, math.ceil(5 / level) - 1)

    def fault(why: str) -> StageError:
        return StageError(f"validate: the drift test of batch {newest} gave no number ({why}) in "
                          f"{space.description}; this is a fault of the check, not 'no drift': set validate.drift: "
                          "off to go on without it, and report it")

    try:
        test = mmd_test(*features, permutations=permutations, seed=DRIFT_SEED, max_items=DRIFT_MAX_ITEMS)
    except ValueError as error:  # features that are NaN or infinite
        raise fault(str(error)) from None
    if not (math.isfinite(test.statistic) and 0 < test.p_value <= 1):
        raise fault(f"statistic {test.statistic}, p-value {test.p_value}")
    drifted = test.p_value <= level
    found = (f"MMD p = {test.p_value:.3g} {'<=' if drifted else '>'} validate.drift_level {level:g}; "
             f"{test.n_now} normal images of batch {newest} against {test.n_before} of {len(batches) - 1} earlier "
             f"batch(es), in {space.description}")
    if not drifted:
        message = f"batch {newest}: no drift found ({found})"
    elif setting == "warn":
        message = (f"WARNING: batch {newest}'s normal images differ from the earlier batches' ({found}): has the "
                   "line changed (lighting, camera, supplier)? validate.drift is warn: the run goes on")
    else:
        message = (f"batch {newest}'s normal images differ from the earlier batches' ({found}): refused "
                   "(validate.drift: refuse). Look at the batch: if the change is intended, run again with "
                   "validate.drift: warn to train on it; if not, fix the line or take the batch out of the landing "
                   "folder")
    return {"setting": setting, "tested": True, "refused": drifted and setting == "refuse", "drifted": drifted,
            "level": level, "newest_batch": newest, "earlier_batches": len(batches) - 1,
            "embedding": space.description, **test.as_dict(), "seconds": round(time.perf_counter() - started, 2),
            "message": message}


class ImageKind(DataKind):
    name = "image"
    unit = "images"
    landing_files = "images"
    score_suffixes = frozenset({".png", ".jpg", ".jpeg"})

    def has_data(self, landing: Path) -> bool:
        return any(p.is_dir() for p in landing.iterdir())

    def generate(self, landing: Path, batch: str, seed: int, options) -> str:
        from components.synthetic import BatchSpec, write_batch

        folder = write_batch(landing, batch, seed, BatchSpec(options.good, options.per_defect, options.size))
        return f"wrote {folder} (seed {seed}: {options.good} good, {options.per_defect} per defect kind)"

    def validate(self, layout: Layout):
        from components.validation import build_manifest, validate_manifest

        config = layout.config
        try:
            files = discover(layout.raw, config.data.extensions, include_all_files=True)
        except ValueError as error:  # a link out of the snapshot (ingest writes none: a hand-made folder)
            raise DataError(f"validate: refused: {error}") from None
        manifest = build_manifest(files, config.preprocess.split.fractions, decode_limits(config))
        report = validate_manifest(manifest, rules_from(config))
        if report.success:  # a refused snapshot is not worth comparing (and may not decode)
            report.drift = _drift(layout, manifest)
        if report.drift and report.drift["refused"]:
            report.failures.append({"expectation": "image_drift", "column": None,
                                    "description": report.drift["message"], "unexpected_count": 0,
                                    "observed_value": report.drift["p_value"], "offending_files": []})
            report.success = False
        return manifest, report

    def preprocess(self, layout: Layout) -> dict:
        return _preprocess(layout)

    def items_file(self, processed: Path, split: str) -> Path:
        return processed / f"{split}_images.npy"

    def model_spec(self, layout: Layout) -> dict:
        from detector.backbones import FEATURE_FAMILIES

        config = layout.config
        if config.model.type in FEATURE_FAMILIES:  # fitted on pretrained features: no width, no epochs
            from detector.feature_detectors import resolve_layers

            return {"family": config.model.type, "channels": config.preprocess.channels,
                    "image_size": config.preprocess.image_size, "backbone": config.model.backbone,
                    "layers": resolve_layers(config.model.type, config.model.backbone, config.model.layers),
                    "backbone_weights": config.model.backbone_weights, "coreset_ratio": config.model.coreset_ratio,
                    "max_bank": config.model.max_bank, "num_neighbors": config.model.num_neighbors}
        return {"family": config.model.type, "channels": config.preprocess.channels,
                "image_size": config.preprocess.image_size, "width": config.model.width,
                "latent_dim": config.model.latent_dim, "eta": config.train.eta}

    def served_spec(self, layout: Layout, spec: dict) -> dict:
        return {"kind": "image", "image_size": spec["image_size"], "channels": spec["channels"]}

    def serving_limits(self, config: Config) -> dict:
        return {"decode_limits": decode_limits(config).as_dict()}

    def test_inputs(self, layout: Layout):
        import pandas as pd

        test, labels = test_rows(layout)
        return pd.DataFrame({"image": [(layout.raw / p).read_bytes() for p in test["path"]]}), labels

    def example(self, layout: Layout, test, spec: dict):
        import pandas as pd

        return pd.DataFrame({"image": [_example_png(test["image"].iloc[0], spec["image_size"],
                                                    layout.config.validation.allowed_formats)]})

    def signature(self, meta: dict):
        """One binary column ``image``; an anomaly map per image on request."""
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

        outputs = Schema([ColSpec(DataType.double, "anomaly_score"), ColSpec(DataType.boolean, "is_anomaly"),
                          ColSpec(DataType.double, "p_value", required=False),
                          ColSpec(DataType.binary, "anomaly_map", required=False)])
        return ModelSignature(inputs=Schema([ColSpec(DataType.binary, "image")]), outputs=outputs,
                              params=ParamSchema([ParamSpec("anomaly_map", DataType.boolean, False)]))

    def score_files(self, layout: Layout, model, files: list[Path], root: Path, heatmaps: bool = False,
                    map_dir: Path | None = None):
        from pipeline.score import MAP_SUFFIX, score_files

        return score_files(model, [f for f in files if not f.name.endswith(MAP_SUFFIX)], root,
                           heatmaps=heatmaps, map_dir=map_dir)
