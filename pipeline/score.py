"""Score images, or the records of CSV/Parquet files (data.kind table), with a registered
model (the champion by default). Which files are read, and how, is the data kind's
(pipeline/kinds/: ``score_suffixes`` and ``score_files``, which call the two scorers here).

``run`` scores a folder and leaves it alone (the CLI's ``score``). ``incoming`` is what
the scoring DAG does with the folder other systems drop images into: every file is
scored exactly once and none is lost, even when a run is killed half-way:

1. claim: each waiting file is renamed into ``<archive>/.inflight/<run>/`` (a rename
   on one file system is atomic, so a file is either waiting or claimed, never both);
2. score every claim folder (this run's, and any a killed run left behind) and write
   ``<results>/<claim>.csv`` atomically; a claim whose CSV exists is not scored again;
3. record the batch on the scoring version's monitoring run (pipeline/monitoring.py: its
   flagged rate and p-values, and the drift test that triggers a retraining);
4. move the claim folder to ``<archive>/<claim>/``; one whose scoring raises goes to
   ``<archive>/failed/<claim>/`` with its error beside it, under a name failed/ has not had
   (Airflow retries a task with the same run id, so a claim name can fail twice), so a
   failure never leaves a claim in ``.inflight`` for every later run to trip over.

Before a file is read its size on disk is checked against the champion's ``max_bytes``, and
it is decoded with the champion's limits (its spec.json's ``decode_limits``): a file the
champion would refuse is refused alone, by name, and a multi-GB file is never read.

Producers should write a file under a hidden name (``.name.png``) or elsewhere and
rename it into the incoming folder when complete: hidden files are never claimed.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import monitoring
from pipeline.io import StageError, atomic_path
from pipeline.kinds import kind_of
from pipeline.layout import Layout
from pipeline.secrets import scrub

INFLIGHT = ".inflight"


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _registry_uri(layout: Layout, model_uri: str | None) -> tuple[str, re.Match]:
    """The URI (the champion by default) if it names the configured model; else a StageError."""
    from pipeline import tracking

    name = layout.config.registry.model_name
    model_uri = model_uri or f"models:/{name}@champion"
    match = re.fullmatch(rf"models:/{re.escape(name)}(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))", model_uri)
    if match is None:
        raise StageError(f"score: refusing model URI {model_uri!r}: models load only from the configured registry "
                         f"({tracking.shown(tracking.tracking_uri(layout))}) as models:/{name}/<version> or models:/{name}@<alias>")
    return model_uri, match


def _load(layout: Layout, model_uri: str | None):
    """(model, uri, version) for a models:/ URI; the champion by default.

    An alias is resolved to its version first and that version is loaded, so the version
    written next to the scores is the one that made them, even if the alias moves meanwhile.
    Only the configured model in the configured registry is loaded: loading a pyfunc runs
    its code, so a path, a runs:/ URI or a URL from outside is refused before any download.
    """
    import mlflow

    from pipeline.registry import connect
    from pipeline import tracking

    model_uri, match = _registry_uri(layout, model_uri)
    client = connect(tracking.store(layout))
    name = layout.config.registry.model_name
    try:
        version = match["version"] or str(client.get_model_version_by_alias(name, match["alias"]).version)
        load_uri = f"models:/{name}/{version}"
        model = mlflow.pyfunc.load_model(load_uri)
    except Exception as error:
        raise StageError(scrub(f"score: cannot load {model_uri}: {error}")) from None  # MLflow names the URL
    return model, model_uri, version


MAP_SUFFIX = ".anomaly_map.png"


def champion_limits(model):
    """The decoding limits the model applies when it scores: its spec.json's ``decode_limits``,
    as its python model loaded them (detector.serving). The pre-check of ``score_files``
    uses them, so a file the champion would refuse is refused alone, by name, instead of
    failing the batch it came in; a model that does not carry them gets the defaults."""
    from detector.decode import DEFAULT_LIMITS, DecodeLimits

    try:
        limits = model.unwrap_python_model().limits
    except Exception:  # not a pyfunc of ours, or a table model: nothing decoded, the defaults
        return DEFAULT_LIMITS
    # rebuilt from its values: the champion's components (packed with it) may be another copy
    return DecodeLimits.from_dict({"max_pixels": getattr(limits, "max_pixels", None) or DEFAULT_LIMITS.max_pixels,
                                   "max_bytes": getattr(limits, "max_bytes", None) or DEFAULT_LIMITS.max_bytes,
                                   "formats": list(getattr(limits, "formats", None) or DEFAULT_LIMITS.formats)})


def score_files(model, files: list[Path], root: Path, heatmaps: bool = False,
                map_dir: Path | None = None) -> pd.DataFrame:
    """One row per image (path relative to ``root``); a file that cannot be scored gets its
    reason, and the others are scored all the same. With ``heatmaps`` (``score.heatmaps``:
    patchcore and padim) each flagged image gets its anomaly map beside it,
    ``<name>.anomaly_map.png`` (grey, 128 = the threshold), named in ``anomaly_map_file``
    (relative to ``map_dir``, default ``root``). A champion that gives no maps (a family trained
    from scratch) is scored all the same, without maps, and says so."""
    from detector.decode import ImageDecodeError, open_image
    from detector.serving import score_bytes

    from pipeline.kinds.image import ImageKind

    suffixes = ImageKind.score_suffixes
    limits = champion_limits(model)
    good, errors = [], {}
    for path in files:
        name = path.relative_to(root).as_posix()
        if path.suffix.lower() not in suffixes:
            errors[name] = f"not a PNG or JPEG file ({path.suffix or 'no extension'})"
            continue
        try:
            # the size on disk first: a multi-GB file is refused without being read (read whole,
            # it would kill the task, and every retry, before any limit was looked at)
            limits.check_bytes(path.stat().st_size)
            with path.open("rb") as handle:
                data = handle.read(limits.max_bytes + 1)  # never more, should it grow meanwhile
            limits.check_bytes(len(data))
            open_image(data, limits).close()  # the champion's limits: what it would refuse, refused here
            good.append((name, data))
        except ImageDecodeError as error:  # one bad file must not stop the others being scored
            errors[name] = str(error)
        except OSError as error:
            errors[name] = f"cannot be read: {error.strerror or error}"
    images = [data for _, data in good]
    predictions = None
    if heatmaps and images:
        try:
            predictions = score_bytes(model, images, {"anomaly_map": True})
        except ValueError as error:  # a champion of a family without maps: score all the same
            print(f"score: no anomaly maps: {error}")
        if predictions is not None and "anomaly_map" not in predictions:
            print("score: no anomaly maps: the champion gives none (registered before maps existed?)")
            predictions = None
    maps = predictions["anomaly_map"].tolist() if predictions is not None else None
    if predictions is None:
        predictions = score_bytes(model, images)
    table = pd.DataFrame({"file": [name for name, _ in good],
                          "anomaly_score": predictions["anomaly_score"].astype(float),
                          "is_anomaly": _never_normal(predictions, "this folder"), "error": "",
                          **_p_value(predictions)})
    if heatmaps:
        written = []
        for n, ((name, _), flagged) in enumerate(zip(good, table["is_anomaly"])):
            if flagged and maps is not None:
                target = (map_dir or root) / (name + MAP_SUFFIX)
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_bytes(maps[n])
                written.append(str(target.relative_to(map_dir or root)))
            else:
                written.append("")
        table["anomaly_map_file"] = written
    return _with_errors(table, errors)


def _with_errors(table: pd.DataFrame, errors: dict[str, str]) -> pd.DataFrame:
    if errors:
        # not scored is not normal: no score, flagged, and the error says why (a consumer that
        # reads is_anomaly alone must not take a refused record for a cleared one)
        bad = pd.DataFrame({"file": list(errors), "anomaly_score": float("nan"), "is_anomaly": True,
                            "error": list(errors.values()), **({"p_value": 0.0} if "p_value" in table else {})})
        table = pd.concat([table, bad], ignore_index=True) if len(table) else bad
        for name, reason in errors.items():
            print(f"score: NOT scored {name}: {reason}")
    return table


PREDICT_ROWS = 16_384  # records per predict call: each call costs MLflow's input checks (256 made 200k rows take 24 s)


def _predict_records(model, frame: pd.DataFrame) -> pd.DataFrame:
    """The model's predictions for a file's records, a chunk at a time, each chunk keeping the
    frame's index: indexed by the records' keys, a refusal (a value of the wrong type, or one
    too far from the training values to encode) names the record by its key, wherever in the
    file it is, as the ``row`` column of the results does."""
    parts = [model.predict(frame.iloc[start:start + PREDICT_ROWS]) for start in range(0, len(frame), PREDICT_ROWS)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["anomaly_score", "is_anomaly"])


def _p_value(predictions: pd.DataFrame) -> dict:
    """The champion's p-values as a column, when it gives them (one registered before p-values
    does not): a score that is not a finite number has p = 0, never normal (detector/conformal.py)."""
    if "p_value" not in predictions:
        return {}
    p = predictions["p_value"].astype(float).to_numpy()
    return {"p_value": np.where(np.isfinite(predictions["anomaly_score"].astype(float).to_numpy()), p, 0.0)}


def check_fdr(layout: Layout, model, version: str | None) -> None:
    """``score.fdr`` needs a champion that gives p-values: refused before any file is claimed."""
    if layout.config.score.fdr is not None and getattr(model.unwrap_python_model(), "normals", None) is None:
        raise StageError(f"score: score.fdr is {layout.config.score.fdr} but the model (v{version or '?'}) gives no "
                         "p_value (registered before p-values existed): retrain it, or set score.fdr: null")


def with_fdr(table: pd.DataFrame, q: float | None) -> pd.DataFrame:
    """``is_anomaly_fdr``: Benjamini-Hochberg at level ``q`` over this batch's p-values, so the
    expected share of normals among the items it flags is at most q (detector/conformal.py).
    An item that could not be scored is flagged (not scored is not normal) and takes no part in
    the procedure. ``q`` None (``score.fdr`` off): the table is returned as it was."""
    from detector.conformal import benjamini_hochberg

    if q is None:
        return table
    scored = (table["error"].fillna("").astype(str) == "").to_numpy()
    flags = np.ones(len(table), dtype=bool)
    flags[scored] = benjamini_hochberg(table.loc[scored, "p_value"].to_numpy(np.float64), q)
    table["is_anomaly_fdr"] = flags
    return table


def _never_normal(predictions: pd.DataFrame, name: str):
    """The flags, with the served model's rule applied to whatever a champion returned (one
    registered before the rule read a -inf score as normal): a score that is not a finite
    number is never normal (detector.scoring.is_anomalous)."""
    import numpy as np

    scores = predictions["anomaly_score"].to_numpy(np.float64)
    flags = predictions["is_anomaly"].astype(bool).to_numpy()
    odd = ~np.isfinite(scores)
    if odd.any():
        print(f"score: {int(odd.sum())} of {len(scores)} in {name} got a score that is not a finite number: "
              "flagged as anomalous (a non-finite score is never normal)")
    return flags | odd


def _model_columns(model) -> list[str] | None:
    """The columns the model reads (its signature's inputs), or None when it declares none."""
    try:
        schema = model.metadata.get_input_schema()
        return list(schema.input_names()) if schema is not None else None
    except Exception:  # not an MLflow pyfunc, or a signature without names: read every column
        return None


def score_table_files(model, files: list[Path], root: Path, key: str, text_columns: tuple[str, ...],
                      chunk_rows: int | None = None) -> pd.DataFrame:
    """data.kind table: one row per record of each CSV/Parquet file (its ``key`` value in
    ``row``, else its row number in the file), read as training read them (``text_columns`` as
    text); a file the model refuses gets one row with the reason, and the others are scored all
    the same.

    A file is read and scored ``chunk_rows`` rows at a time (``components.tables.CHUNK_ROWS``
    by default): a fraud team's file of millions of rows needs memory for one chunk's features,
    not the file's. Only the results of every row are kept (Benjamini-Hochberg needs all the
    p-values), and a file's are kept aside until its last chunk is scored: a file that fails at
    any chunk gets its one error row and none of its rows. Parquet is read for the model's
    columns and the key alone; the others are never decoded."""
    from components import tables

    chunk_rows = chunk_rows or tables.CHUNK_ROWS
    wanted = _model_columns(model)
    columns = None if wanted is None else [*wanted, *([key] if key not in wanted else [])]
    parts, errors = [], {}
    for path in files:
        name = path.relative_to(root).as_posix()
        rows, predictions, numbered = [], [], 0
        try:
            for frame in tables.iter_table_file(path, text_columns, chunk_rows=chunk_rows, columns=columns):
                # the key as text, or the row number in the file: numbered on from the chunk before
                chunk_keys = frame[key].astype(str) if key in frame.columns else \
                    pd.Series(range(numbered, numbered + len(frame))).astype(str)
                numbered += len(frame)
                if len(frame):
                    if wanted is not None:  # the model's columns alone: MLflow warns of every extra one, per call
                        frame = frame[[c for c in frame.columns if c in set(wanted)]]
                    predictions.append(_predict_records(model, frame.set_axis(chunk_keys.to_numpy())))
                    rows.append(chunk_keys.to_numpy())
        except Exception as error:  # a file missing a column, or unreadable: the others are still scored
            message = str(error) or type(error).__name__
            if "Failed to enforce schema" in message:  # MLflow's signature check: its reason, not the whole frame
                message = message.split("Error: ", 1)[-1]
            errors[name] = message.splitlines()[0]
            continue
        keys = np.concatenate(rows) if rows else np.array([], dtype=object)
        scored = pd.concat(predictions, ignore_index=True) if predictions else _predict_records(model, pd.DataFrame())
        parts.append(pd.DataFrame({"file": name, "row": keys,
                                   "anomaly_score": scored["anomaly_score"].astype(float).to_numpy(),
                                   "is_anomaly": _never_normal(scored, name), "error": "",
                                   **_p_value(scored)}))
    table = pd.concat(parts, ignore_index=True) if parts else \
        pd.DataFrame(columns=["file", "row", "anomaly_score", "is_anomaly", "error"])
    return _with_errors(table, errors)


def _write_csv(table: pd.DataFrame, out: Path) -> None:
    with atomic_path(Path(out)) as tmp:
        table.to_csv(tmp, index=False)


def run(layout: Layout, folder: Path, out: Path | None, model_uri: str | None = None) -> pd.DataFrame:
    folder = Path(folder)
    _registry_uri(layout, model_uri)  # a refused URI is the first thing to hear about
    if not folder.is_dir():
        raise StageError(f"score: folder does not exist: {folder}")
    kind = kind_of(layout.config)
    files = [p for p in _visible_files(folder) if p.suffix.lower() in kind.score_suffixes]
    if not files:
        raise StageError(f"score: no {' or '.join(s[1:].upper() for s in sorted(kind.score_suffixes))} files "
                         f"under {folder}")
    model, model_uri, version = _load(layout, model_uri)
    # the folder scored is the user's: anomaly maps (score.heatmaps) go beside --out, not into it
    map_dir = Path(out).with_name(Path(out).stem + "-maps") if out is not None else None
    if layout.config.score.heatmaps and out is None:
        print("score: score.heatmaps is on but there is no --out to write the maps beside; none written")
    check_fdr(layout, model, version)
    table = kind.score_files(layout, model, files, folder, heatmaps=layout.config.score.heatmaps and out is not None,
                             map_dir=map_dir)
    table = with_fdr(table, layout.config.score.fdr)
    table["model_uri"], table["model_version"] = model_uri, version
    if out is not None:
        _write_csv(table, out)
    unscored = int((table["error"] != "").sum())
    flagged = int(table["is_anomaly"].sum()) - unscored
    print(f"score: {len(table)} {layout.unit} with {model_uri} (v{version or '?'}): {flagged} flagged as anomalous"
          + (f", {unscored} could not be scored (flagged too: not scored is not normal)" if unscored else "")
          + (f"; at FDR {layout.config.score.fdr}: {int(table['is_anomaly_fdr'].sum()) - unscored} flagged"
             if "is_anomaly_fdr" in table else "")
          + (f"; written to {out}" if out else ""))
    return table


def _unused_name(name: str, *taken_in: Path, suffix: str = "") -> str:
    """name, or name-2, name-3 ... so that a retried run never claims into an old batch's name."""
    candidate, n = name, 1
    while any((folder / f"{candidate}{suffix}").exists() or (folder / candidate).exists() for folder in taken_in):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def incoming(layout: Layout, claim_name: str, model_uri: str | None = None) -> dict:
    """Score what waits in ``score.incoming`` (see the module docstring); returns a summary.

    One scorer at a time per archive (an exclusive lock), so a CLI run beside the DAG, or a
    task Airflow thinks dead, cannot take another's claim. A claim that cannot be scored is
    moved to ``<archive>/failed/`` with its error, so it does not block every later run.
    """
    import fcntl

    inbox, archive, results = layout.incoming, layout.scored_archive, layout.score_results
    inflight = archive / INFLIGHT
    inbox.mkdir(parents=True, exist_ok=True)
    inflight.mkdir(parents=True, exist_ok=True)
    with (archive / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _score_incoming(inbox, archive, inflight, results, layout, claim_name, model_uri)


def _score_incoming(inbox: Path, archive: Path, inflight: Path, results: Path, layout: Layout, claim_name: str,
                    model_uri: str | None) -> dict:
    waiting = _visible_files(inbox)
    left_over = sorted(p for p in inflight.iterdir() if p.is_dir())
    if not waiting and not left_over:
        print(f"score: nothing waiting in {inbox}")
        return {"files": 0, "flagged": 0, "errors": 0, "claims": [], "monitor": [], "drift_alarm": False}
    model, model_uri, version = _load(layout, model_uri)  # no champion: every file stays where it is
    check_fdr(layout, model, version)

    if waiting:
        # a name no claim, archived batch, set-aside batch or result has: Airflow retries a task
        # with the same run id, so the same claim_name comes back after a failure
        claim = inflight / _unused_name(claim_name, inflight, archive, archive / "failed", results, suffix=".csv")
        for path in waiting:
            target = claim / path.relative_to(inbox)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    claims = sorted(p for p in inflight.iterdir() if p.is_dir())

    summary = {"files": 0, "flagged": 0, "errors": 0, "claims": [], "failed_claims": [],
               "model_uri": model_uri, "model_version": version, "monitor": [], "drift_alarm": False}
    for folder in claims:
        out = results / f"{folder.name}.csv"
        destination = archive / _unused_name(folder.name, archive)
        try:
            if out.is_file():  # scored before a kill; only the move was left to do
                table = pd.read_csv(out, keep_default_na=False, na_values=[""])
            else:
                table = kind_of(layout.config).score_files(layout, model, _visible_files(folder), folder,
                                                           heatmaps=layout.config.score.heatmaps)
                table = with_fdr(table, layout.config.score.fdr)
                table["model_uri"], table["model_version"] = model_uri, version
                table["scored_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                table["archived_to"] = [str(destination / name) for name in table["file"]]
                _write_csv(table, out)
        except Exception as error:  # keep the files, set them aside, tell the operator
            fresh = _unused_name(folder.name, archive / "failed", suffix=".error.txt")
            if fresh != folder.name:  # failed/ has this name already (a claim from before that rule):
                # rename the claim first, so the move below cannot meet a full folder (ENOTEMPTY,
                # and the claim stuck in .inflight for every later run) nor overwrite an error text
                folder = folder.rename(inflight / _unused_name(fresh, inflight))
            failed = archive / "failed" / folder.name
            failed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(folder, failed)
            (failed.parent / f"{folder.name}.error.txt").write_text(scrub(f"{type(error).__name__}: {error}\n"))
            print(scrub(f"score: could NOT score claim {folder.name} ({type(error).__name__}: {error}); "
                        f"its files are in {failed}"))
            summary["failed_claims"].append(str(failed))
            continue
        # before the move: should the registry be down, the claim stays in flight with its results,
        # and the retry records it (once: the monitor remembers the claims it counted)
        watched = monitoring.record_batch(layout, version, table, folder.name)
        summary["monitor"].append(watched)
        summary["drift_alarm"] = summary["drift_alarm"] or watched["fired_now"]
        os.replace(folder, destination)
        summary["files"] += len(table)
        unscored = table["error"].fillna("").astype(str) != ""
        summary["flagged"] += int((table["is_anomaly"].astype(str).str.lower().eq("true") & ~unscored).sum())
        summary["errors"] += int(unscored.sum())
        summary["claims"].append({"claim": folder.name, "results": str(out), "archive": str(destination),
                                  "files": len(table)})
    print(f"score: {summary['files']} {layout.unit} scored with {model_uri} (v{version or '?'}): {summary['flagged']} "
          f"flagged as anomalous, {summary['errors']} could not be scored; results in {results}")
    if summary["failed_claims"]:
        raise StageError(f"score: {len(summary['failed_claims'])} claim(s) could not be scored and were set aside: "
                         + ", ".join(summary["failed_claims"]))
    return summary
