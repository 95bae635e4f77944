"""python -m pipeline reproduce <model version | run id>: rebuild a registered model from
its record and compare it with what was recorded.

What a run records is enough to rebuild it (pipeline/stages/register.py logs it):
the code commit (``git_commit`` tag) and, for a run from a dirty tree, the difference
(``pipeline/uncommitted.patch``); the params (``pipeline/params.yaml``); and the data
version, as the run's ``pipeline/dvc.lock``, whose hash of the raw snapshot the DVC cache
or remote still holds. A scratch git worktree gets all three, DVC checks the snapshot
out, and every stage after ingest runs again, forced (no stage or run cache).

The metrics and threshold are then compared with the recorded ones, and the data the
rebuild read (hashed afresh) with the recorded data version. Training on the CPU is
bit-for-bit deterministic (components/training.py) for one thread count and torch
version (train.json records both), so then every value must be equal, and so must the
weights' hash. On a GPU (either side: cuDNN and bf16 autocast are not bit-exact), or
with another thread count or torch version, values must agree within ``tolerance``
(relative and absolute) and the weights' hash is shown but not required to match.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import dvc_cli
from pipeline.io import StageError, read_json
from pipeline.layout import Layout

GPU_TOLERANCE = 1e-3
RECORDED = ("params.yaml", "dvc.lock", "metrics.json", "threshold.json", "train.json")


@dataclass(frozen=True)
class Row:
    name: str
    recorded: object
    reproduced: object
    match: bool
    required: bool = True


def _resolve(client, name: str, ref: str) -> tuple[str, str | None]:
    """(MLflow run id, model version or None) of a version number, an alias or a run id."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.isdigit():
            return client.get_model_version(name, ref).run_id, ref
        if ref.startswith("@"):
            version = client.get_model_version_by_alias(name, ref[1:])
            return version.run_id, str(version.version)
        return client.get_run(ref).info.run_id, None
    except MlflowException as error:
        raise StageError(f"reproduce: {ref!r} is neither a version nor an alias of {name} nor an MLflow run id "
                         f"in this registry: {str(error).splitlines()[0]}") from None


def _version_of(client, name: str, run_id: str) -> str | None:
    """The (first) version of ``name`` registered from ``run_id``; None when it made none."""
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return str(min(int(v.version) for v in found)) if found else None


def _patch_files(patch: bytes) -> list[str]:
    """The files a recorded patch changes, from its ``diff --git a/<path> b/<path>`` lines."""
    files = []
    for line in patch.decode("utf-8", "replace").splitlines():
        if line.startswith("diff --git a/") and " b/" in line:
            files.append(line.rsplit(" b/", 1)[1])
    return files


def _describe_patch(patch: Path) -> str:
    if not patch.is_file():
        return "no patch (the run's tree was clean, or it recorded none)"
    files = _patch_files(patch.read_bytes())
    return (f"patch of {len(files)} file{'s' if len(files) != 1 else ''}, {patch.stat().st_size} bytes: "
            + ", ".join(files))


def _run(command: list[str], cwd: Path, env: dict[str, str] | None = None, quiet: bool = False) -> int:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT if quiet else None
                          ).returncode


def _git(project: Path, *args: str) -> None:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if result.returncode != 0:
        raise StageError(f"reproduce: git {' '.join(args)} failed: {result.stderr.strip()}")


def _rows(recorded: dict, reproduced: dict, tolerance: float | None, prefix: str = "") -> list[Row]:
    rows = []
    for key in sorted(set(recorded) | set(reproduced)):
        old, new = recorded.get(key), reproduced.get(key)
        if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
            continue
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool) \
                and tolerance is not None:
            same = math.isclose(float(old), float(new), rel_tol=tolerance, abs_tol=tolerance)
        else:
            same = old == new
        rows.append(Row(prefix + key, old, new, same))
    return rows


def _same(name: str, recorded: object, reproduced: object, required: bool = True) -> Row:
    """A row that matches only when both sides are known and equal."""
    return Row(name, recorded, reproduced, recorded is not None and recorded == reproduced, required)


def _read_hash(lock: dict, path: str) -> str | None:
    """The hash of ``path`` as the rebuild's stages read it (a dependency, hashed afresh)."""
    for stage in (lock.get("stages") or {}).values():
        for dep in (stage or {}).get("deps", []):
            if dep.get("path") == path:
                return dep.get("md5")
    return None


def _out_hash(lock: dict, stage: str, path: str) -> str | None:
    for out in (lock.get("stages", {}).get(stage, {}) or {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


def print_table(rows: list[Row], title: str) -> None:
    def show(value: object) -> str:
        return "-" if value is None else (f"{value:.10g}" if isinstance(value, float) else str(value))

    width = max(len(r.name) for r in rows)
    cells = [(r.name, show(r.recorded), show(r.reproduced),
              "ok" if r.match else ("MISMATCH" if r.required else "differs (not required)")) for r in rows]
    left = max(len(c[1]) for c in cells + [("", "recorded", "", "")])
    print(f"\n{title}\n{'':{width}}  {'recorded':>{left}}  reproduced")
    for name, old, new, verdict in cells:
        print(f"{name:{width}}  {old:>{left}}  {new:<{max(len(new), 16)}}  {verdict}")


def reproduce(layout: Layout, ref: str, tolerance: float | None = None, keep: bool = False,
              workdir: Path | None = None, any_run: bool = False) -> tuple[bool, list[Row], Path]:
    """Rebuild ``ref`` in a scratch worktree; returns (all required rows match, rows, worktree).

    A rebuild runs the recorded code, patch included, on this machine. So a run id is taken
    only when the run made a version of the configured model (what register records, and
    what the registry vouches for); any other run only with ``any_run``, and then the output
    says so. Either way it says first what runs: the run, its commit, and the patch's files.
    """
    from pipeline.registry import connect
    from pipeline import graph, tracking, workspace
    from pipeline.secrets import scrub

    client = connect(tracking.store(layout))
    name = layout.config.registry.model_name
    run_id, version = _resolve(client, name, ref)
    if version is None:
        version = _version_of(client, name, run_id)
    run = client.get_run(run_id)
    commit = run.data.tags.get("git_commit", "unknown")
    if commit in ("", "unknown"):
        raise StageError(f"reproduce: run {run_id} recorded no git commit; it cannot be rebuilt")
    label = f"{name} v{version} (run {run_id})" if version else f"run {run_id}"

    project = layout.root
    workspace.runs_dir(project).mkdir(parents=True, exist_ok=True)
    scratch = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="reproduce-", dir=workspace.runs_dir(project)))
    record = scratch / ".recorded"
    root = scratch / "work"
    try:
        record.mkdir(parents=True, exist_ok=True)
        try:
            client.download_artifacts(run_id, "pipeline", str(record))
        except Exception as error:  # no record at all: said below, by the files it lacks
            print(f"reproduce: run {run_id} has no pipeline record: {scrub(str(error)).splitlines()[0]}")
        recorded = record / "pipeline"
        patch = recorded / "uncommitted.patch"
        if version is None and not any_run:
            raise StageError(
                f"reproduce: refused: run {run_id} made no version of {name}, so nothing vouches for its code "
                f"(commit {commit[:12]}, {_describe_patch(patch)}), and a rebuild runs it here. Name a version "
                f"(7, @champion) or a run that registered one; to rebuild this run anyway, add --any-run")
        if version is None:
            label = f"run {run_id} (made no version of {name}; --any-run)"
        print(f"reproduce: {label}: commit {commit[:12]}, data {run.data.tags.get('data_version', '?')}, "
              f"{_describe_patch(patch)}")
        missing = [f for f in ("params.yaml", "dvc.lock", "metrics.json", "threshold.json")
                   if not (recorded / f).is_file()]
        if missing:
            raise StageError(f"reproduce: run {run_id} did not record {', '.join(missing)}; it cannot be rebuilt")

        _git(project, "worktree", "add", "--detach", "--force", str(root), commit)
        if patch.is_file():
            print("reproduce: the run's code had uncommitted changes; applying its recorded patch")
            _git(root, "apply", "--binary", "--whitespace=nowarn", str(patch))
        elif run.data.tags.get("git_dirty") == "true":
            print("reproduce: WARNING the run's code had uncommitted changes and no patch was recorded; "
                  f"rebuilding from commit {commit[:12]} as it is")
        shutil.copy2(recorded / "params.yaml", root / "params.yaml")
        shutil.copy2(recorded / "dvc.lock", root / "dvc.lock")
        workspace.share_dvc_stores(project, root)

        params = yaml.safe_load((root / "params.yaml").read_text())
        raw = params["paths"]["raw"]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("MLFLOW_RUN_ID", None)  # a rebuild logs nothing into the registry
        dvc = [sys.executable, "-m", "dvc"]
        if _run([*dvc, "checkout", "--quiet", raw], root, env, quiet=True) != 0 and \
                _run([*dvc, "pull", "--quiet", raw], root, env) != 0:
            raise StageError(f"reproduce: the data version of {label} ({raw} at "
                             f"{run.data.tags.get('data_version')}) is neither in the DVC cache nor in the remote")
        stages = [s for s in graph.stages(root) if raw not in s.outs]
        for stage in stages:
            print(f"reproduce: running {stage.name}")
            if _run([*dvc_cli.COMMAND, "repro", "--force", "--no-run-cache", "--single-item", stage.name], root,
                    env) != 0:
                raise StageError(f"reproduce: stage {stage.name} failed in {root}")

        # paths from the recorded params as they are: an old record need not pass today's schema
        reports, models = root / params["paths"]["reports"], root / params["paths"]["models"]
        old_lock = yaml.safe_load((recorded / "dvc.lock").read_text())
        new_lock = yaml.safe_load((root / "dvc.lock").read_text())
        old_train = read_json(recorded / "train.json") if (recorded / "train.json").is_file() else {}
        new_train = read_json(reports / "train.json")
        setup = ("device", "threads", "torch")
        exact = "cuda" not in (old_train.get("device"), new_train.get("device")) and \
            all(old_train.get(k) == new_train.get(k) for k in setup)
        tol = tolerance if exact else (tolerance if tolerance is not None else GPU_TOLERANCE)
        rows = [_same("data version", run.data.tags.get("data_version"), _read_hash(new_lock, raw))]
        rows += [Row(k, old_train.get(k), new_train.get(k), old_train.get(k) == new_train.get(k), required=False)
                 for k in setup]
        weights = str(Path(params["paths"]["models"]) / "model.pt")
        rows.append(_same("weights md5", _out_hash(old_lock, "train", weights), _out_hash(new_lock, "train", weights),
                          required=exact))
        calibration_keys = ("threshold", "fpr_bound", "method")
        old_cal, new_cal = read_json(recorded / "threshold.json"), read_json(models / "threshold.json")
        rows += _rows({k: old_cal.get(k) for k in calibration_keys}, {k: new_cal.get(k) for k in calibration_keys},
                      tol, "calibration ")
        rows += _rows(read_json(recorded / "metrics.json"), read_json(reports / "metrics.json"), tol, "test ")
        matched = all(r.match for r in rows if r.required)
        mode = ("exactly (CPU, same threads and torch)" if tol is None else f"within tolerance {tol:g}") + \
            ("" if exact else " (a GPU, or another thread count or torch version: not bit-exact)")
        print_table(rows, f"reproduce {label}: must match {mode}")
        print(f"\nreproduce: {'MATCH' if matched else 'MISMATCH'}: "
              + ("the rebuilt model equals the recorded one" if matched else
                 ", ".join(r.name for r in rows if r.required and not r.match) + " differ"))
        return matched, rows, root
    finally:
        if not keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=project, capture_output=True)
            shutil.rmtree(scratch, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=project, capture_output=True)
        else:
            print(f"reproduce: rebuilt workspace kept at {root}")
