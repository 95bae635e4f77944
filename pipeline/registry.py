"""MLflow: the tracking store, the registered detector, and the champion alias.

The ``champion`` alias only ever moves through ``promote``, which re-reads the
current champion right before moving it, checks the candidate is READY and loads,
and keeps the old one as ``previous``. ``rollback`` is the way back.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)
CHAMPION, PREVIOUS = "champion", "previous"


class PromotionError(RuntimeError):
    """The alias cannot move; the champion is left where it was."""


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_root: str | None = None


def connect(store: Store) -> MlflowClient:
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(name).experiment_id


def log_detector(weights: Path, spec: dict[str, Any], threshold: float, example: pd.DataFrame, model_name: str,
                 pip_requirements: list[str], code_dir: Path,
                 calibration_normals: Path | None = None) -> tuple[str, str]:
    """Log the pyfunc in the active run and register it; returns (model_uri, version).

    ``spec`` is the train stage's spec.json (with the decoding limits for images, the
    encoding for tables); the threshold joins it in the model's own spec.json. The signature
    is the data kind's (pipeline/kinds/), named by the spec (a spec without one is an image
    model's, as every image model's before 2026-12-04 was). ``calibration_normals`` (the
    calibrate stage's sorted normal scores) lets the model return a conformal ``p_value``."""
    import tempfile

    from pipeline.kinds import kind_named

    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / "spec.json"
        meta = {**spec, "threshold": threshold}
        spec_path.write_text(json.dumps(meta, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code_dir / "serving_entry.py"),
            artifacts={"weights": str(weights), "spec": str(spec_path),
                       **({"calibration_normals": str(calibration_normals)} if calibration_normals else {})},
            code_paths=[str(code_dir)],
            signature=kind_named(meta.get("kind", "image")).signature(meta),
            input_example=example,
            pip_requirements=pip_requirements,
            registered_model_name=model_name,
        )
    return info.model_uri, str(info.registered_model_version)


def wait_until_ready(client: MlflowClient, name: str, version: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise PromotionError(f"model version {name} v{version} is {status}, not READY")
        time.sleep(0.5)


NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points to; None only when there is no such alias or model.

    Any other error (the server is down, a 5xx) is raised: read as "no champion" it would
    let a candidate replace a champion it was never compared with.
    """
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in NOT_FOUND:
            return None
        raise


def tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, "" if value is None else str(value))


@contextmanager
def promotion_lock(path: Path | None, timeout: float = 600.0) -> Iterator[None]:
    """One alias move at a time on this machine (an exclusive flock on ``path``).

    MLflow has no compare-and-set on aliases, so two promotions that both read the
    champion and then both move it could leave the worse model serving. Holding this
    lock from the re-read to the move makes the second promotion see the first one's
    result. Promotions from several machines need max_active_runs=1 (the DAG's) or a
    lock file on a shared file system. ``None`` means no lock (a single caller).
    """
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionError(f"another promotion has held {path} for {timeout:.0f} s; not promoted")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(client: MlflowClient, name: str, version: str, *, reason: str, forced: bool = False,
            actor: str | None = None, lock: Path | None = None, gated_against: str | None = None,
            recheck: Callable[[str], list[str]] | None = None) -> dict[str, Any]:
    """Move champion to version; the replaced champion becomes previous.

    Checks first that the version is READY and that its model loads, so a version
    whose upload did not finish can never serve. Then, under ``lock``, re-reads the
    champion (a read that fails is a PromotionError: nothing moves): if it is no longer
    ``gated_against`` (the one the gates compared with), another promotion got there first,
    and ``recheck(current)`` must return no failed gate reasons for the move to go on (a
    forced promotion skips that).
    """
    version = str(version)
    wait_until_ready(client, name, version, timeout=60)
    try:
        mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    except Exception as error:
        raise PromotionError(f"{name} v{version} does not load, not promoted: {error}") from None
    with promotion_lock(lock):
        try:  # re-read right before the move; unread, nothing says whom the candidate would replace
            current = alias_version(client, name, CHAMPION)
        except (MlflowException, OSError) as error:
            raise PromotionError(f"the '{CHAMPION}' alias of {name} could not be read right before the move, so "
                                 f"v{version} was not promoted and the champion is unchanged: "
                                 f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        if current not in (version, gated_against, None) and recheck is not None and not forced:
            reasons = recheck(current)
            if reasons:
                log.info("%s: v%s not promoted; champion moved to v%s since its gates: %s", name, version, current,
                         "; ".join(reasons))
                return {"promoted": False, "champion": current, "previous": alias_version(client, name, PREVIOUS),
                        "reasons": reasons}
        return _move(client, name, version, current, reason, forced, actor)


def _move(client: MlflowClient, name: str, version: str, current: str | None, reason: str, forced: bool,
          actor: str | None) -> dict[str, Any]:
    if current == version:
        previous = alias_version(client, name, PREVIOUS)
        if "promoted_at" in client.get_model_version(name, version).tags:
            return {"promoted": False, "champion": version, "previous": previous,
                    "note": f"v{version} is already the champion"}
        # the alias moved but the record of it was not written (a killed promote): finish it
        _tag_promotion(client, name, version, previous, reason, forced, actor)
        return {"promoted": True, "champion": version, "previous": previous, "forced": forced}
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    _tag_promotion(client, name, version, current, reason, forced, actor)
    log.info("%s: champion %s -> v%s (%s)", name, f"v{current}" if current else "none", version, reason)
    return {"promoted": True, "champion": version, "previous": current, "forced": forced}


def _tag_promotion(client: MlflowClient, name: str, version: str, over: str | None, reason: str, forced: bool,
                   actor: str | None) -> None:
    tag_version(client, name, version, {
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "promoted_by": actor or getpass.getuser(), "promoted_over": over or "",
        "promotion_reason": reason, "forced_promotion": str(forced).lower(),
    })


def rollback(client: MlflowClient, name: str, *, reason: str, actor: str | None = None,
             lock: Path | None = None) -> dict[str, Any]:
    """champion <- previous; previous <- the version that one had replaced (if any)."""
    if not reason.strip():
        raise PromotionError("rollback needs a reason")
    with promotion_lock(lock):
        return _roll_back(client, name, reason, actor)


def _roll_back(client: MlflowClient, name: str, reason: str, actor: str | None) -> dict[str, Any]:
    current, target = alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)
    if target is None:
        raise PromotionError(f"{name} has no '{PREVIOUS}' alias: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, target)
    before_target = client.get_model_version(name, target).tags.get("promoted_over") or None
    if before_target and before_target != target:
        client.set_registered_model_alias(name, PREVIOUS, before_target)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    who = actor or getpass.getuser()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if current is not None:
        tag_version(client, name, current, {"rolled_back_at": when, "rolled_back_by": who,
                                            "rollback_reason": reason})
    tag_version(client, name, target, {"restored_at": when, "restored_by": who, "restore_reason": reason})
    return {"champion": target, "previous": before_target, "rolled_back_from": current, "by": who, "reason": reason}
