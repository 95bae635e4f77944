"""A scheduled run's own workspace, so that runs never step on each other's files.

Each run works in ``<project>/runs/<run key>``: a git worktree of the project at its
current commit, with the project's uncommitted changes laid over it (so the MLflow run
records ``git_dirty`` truthfully), the run's parameter overrides written into its own
``params.yaml``, and DVC pointed at the project's cache and remote. Sharing the cache
is what lets DVC skip unchanged stages across runs (its run cache lives there too);
sharing nothing else is what lets two runs, or a run and a developer, work at once.

The record ``.workspace.json`` holds what every later task of the run needs: the
MLflow run id and the overrides. Creating a workspace that exists already returns
it, so a retried or later task of the same run finds its files where it left them.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ConfigError, load
from pipeline.io import atomic_path
from pipeline.layout import Layout

RECORD = ".workspace.json"
RUNS_ENV = "ANOMALY_PIPELINE_RUNS"  # where workspaces go; default <project>/runs
KEEP_ENV = "ANOMALY_PIPELINE_KEEP_RUNS"  # finished workspaces kept for inspection; default 5


@dataclass(frozen=True)
class Workspace:
    root: Path
    project: Path
    record: dict[str, Any]

    @property
    def layout(self) -> Layout:
        return Layout(root=self.root, config=load(self.root / "params.yaml"))

    @property
    def mlflow_run_id(self) -> str | None:
        return self.record.get("mlflow_run_id")


def runs_dir(project: Path) -> Path:
    return Path(os.environ.get(RUNS_ENV) or Path(project) / "runs")


_HASHED = re.compile(r"-[0-9a-f]{8}$")


def key_of(run_id: str) -> str:
    """The run's folder name: the run id where it is a plain folder name already, else the id
    made one (Airflow's ids hold ':' and '+'), readable, plus a short hash of the id itself.

    The hash keeps two ids apart that become the same name (``manual__...T00:00:00+00:00`` and
    ``manual__...T00-00-00-00-00``): two runs in one folder would share a worktree and an
    MLflow run. An id that ends like a hashed name is hashed too, so it cannot equal one.
    The score DAG names its claims with it as well."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")[:200].rstrip("-.") or "run"
    if safe == run_id and not _HASHED.search(run_id):
        return safe
    return f"{safe}-{hashlib.sha256(run_id.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def apply_overrides(params: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys (``train.epochs``) in a params mapping; an unknown section is an error."""
    for dotted, value in overrides.items():
        *sections, leaf = dotted.split(".")
        node = params
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise ConfigError(f"invalid params:\n  {dotted}: no such section {section!r}")
            node = node[section]
        node[leaf] = value
    return params


def _git(project: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {project}: {result.stderr.strip()}")
    return result.stdout


def _overlay_uncommitted(project: Path, root: Path) -> None:
    """Make the worktree's code equal the project's: every change against HEAD to a tracked
    file, staged or not, and the untracked files under the code folders; never a file whose
    name looks like a secret (a ``.env``, a key), which stays in the project alone
    (pipeline/code_changes.py)."""
    from pipeline.code_changes import code_changes

    changes = code_changes(project)
    if changes.left_out:
        print(f"workspace: not copied into the run's workspace, as their names look like secrets: "
              f"{', '.join(changes.left_out)}", file=sys.stderr)
    for name in changes.deleted:
        (root / name).unlink(missing_ok=True)
    for name in changes.changed + changes.untracked:
        if (project / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, root / name)


def _dvc_remotes(project: Path) -> dict[str, str]:
    """Each remote's url, from ``dvc config --list`` (``remote.<name>.url=<url>``): not from
    ``dvc remote list``, a table that DVC wraps at 80 columns, so a long path split the line
    into a name and a url that were not theirs."""
    out = subprocess.run([sys.executable, "-m", "dvc", "config", "--list"], cwd=project, capture_output=True,
                         text=True).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"^remote\.(.+)\.url=(.*)$", out, re.MULTILINE)}


def share_dvc_stores(project: Path, root: Path) -> None:
    """The run's DVC uses the project's cache, and its remotes with their paths made absolute.

    The project's ``.dvc/config.local`` (git-ignored, so not in the worktree) comes along
    first: it is where a deployment keeps what must not be committed, such as an S3 remote's
    ``endpointurl``, profile or keys, or a remote that replaces the committed default."""
    dvc = [sys.executable, "-m", "dvc"]
    if (project / ".dvc" / "config.local").is_file():
        shutil.copy2(project / ".dvc" / "config.local", root / ".dvc" / "config.local")
    cache = subprocess.run([*dvc, "cache", "dir"], cwd=project, capture_output=True, text=True).stdout.strip()
    subprocess.run([*dvc, "cache", "dir", "--local", cache or str(project / ".dvc" / "cache")], cwd=root, check=True,
                   capture_output=True)
    for name, url in _dvc_remotes(project).items():
        if "://" not in url and not os.path.isabs(url):
            url = str((project / ".dvc" / url).resolve())
        subprocess.run([*dvc, "remote", "modify", "--local", name, "url", url], cwd=root, check=True,
                       capture_output=True)


def _run_params(project: Path, overrides: dict[str, Any]) -> dict:
    """The project's params.yaml (as the worktree will hold it) with the run's overrides."""
    params = yaml.safe_load((project / "params.yaml").read_text()) or {}
    apply_overrides(params, overrides)
    landing = Path(str(params.get("data", {}).get("landing", "data/landing")))
    if not landing.is_absolute():  # the data lands in the project, not in the run's copy of it
        params.setdefault("data", {})["landing"] = str((project / landing).resolve())
    from pipeline.config import Data

    data = params.setdefault("data", {})
    if isinstance(data.get("allowed_roots", []), list):  # the project's folders, not the run's (empty) copy
        data["allowed_roots"] = [str((project / root).resolve()) if isinstance(root, str) and root.strip() else root
                                 for root in data.get("allowed_roots", Data().allowed_roots)]
    weights = str(params.get("model", {}).get("backbone_weights", "auto"))
    if weights not in ("auto", "download", "none") and not Path(weights).expanduser().is_absolute():
        # a weights file kept in the project (git-ignored, so not in the run's worktree)
        params["model"]["backbone_weights"] = str((project / weights).resolve())
    return params


def create(project: Path, run_id: str, overrides: dict[str, Any] | None = None) -> Workspace:
    """The run's workspace, made on first call; later calls return the same one.

    Bad overrides raise ConfigError before anything is made, so a refused trigger
    leaves no folder, no MLflow run and no model behind.
    """
    project = Path(project).resolve()
    root = runs_dir(project) / key_of(run_id)
    if (root / RECORD).is_file():
        return Workspace(root, project, json.loads((root / RECORD).read_text()))
    overrides = dict(overrides or {})
    # check the run's params first: same file the stages will read, same error messages
    params = _run_params(project, overrides)
    scratch = root.parent / f".{root.name}.params-check.yaml"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    try:
        scratch.write_text(yaml.safe_dump(params, sort_keys=False))
        load(scratch, check_landing=True)
    finally:
        scratch.unlink(missing_ok=True)

    prune(project, keep=int(os.environ.get(KEEP_ENV, "5")) - 1)  # and this one makes the count
    if root.exists():  # a half-made workspace from a killed task: start it again
        _remove(project, root)
    _git(project, "worktree", "add", "--detach", "--force", str(root), "HEAD")
    _overlay_uncommitted(project, root)
    share_dvc_stores(project, root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))  # the params checked above
    # what the MLflow run records as git_dirty: the project's own state, not this copy's
    # (whose params.yaml always differs, holding the run's overrides and absolute landing)
    dirty = bool(_git(project, "status", "--porcelain", "--untracked-files=no").strip())
    record = {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": overrides,
              "commit": _git(project, "rev-parse", "HEAD").strip(), "project_dirty": dirty}
    with atomic_path(root / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    link = runs_dir(project) / f".latest-{os.getpid()}"  # made aside and renamed: runs starting at once
    link.unlink(missing_ok=True)
    link.symlink_to(root.name)
    os.replace(link, runs_dir(project) / "latest")
    return Workspace(root, project, record)


def update(workspace: Workspace, **fields: Any) -> Workspace:
    record = {**workspace.record, **fields}
    with atomic_path(workspace.root / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return Workspace(workspace.root, workspace.project, record)


def latest(project: Path) -> Path | None:
    link = runs_dir(project) / "latest"
    return link.resolve() if link.exists() else None


def _remove(project: Path, root: Path) -> None:
    _git(project, "worktree", "remove", "--force", str(root), check=False)
    shutil.rmtree(root, ignore_errors=True)
    _git(project, "worktree", "prune", check=False)


def prune(project: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest workspaces (their results live on in MLflow and DVC)."""
    folder = runs_dir(project)
    if not folder.is_dir():
        return []
    made = sorted((p for p in folder.iterdir() if (p / RECORD).is_file() and not p.is_symlink()),
                  key=lambda p: (p / RECORD).stat().st_mtime, reverse=True)
    removed = made[keep:] if keep >= 0 else []
    for root in removed:
        _remove(project, root)
    return removed
