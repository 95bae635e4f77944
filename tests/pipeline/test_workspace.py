"""A run's workspace: its own worktree and params, the project's DVC cache and remote,
and nothing made when the trigger's values are refused."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import make_workspace
from pipeline import workspace
from pipeline.config import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv(workspace.RUNS_ENV, raising=False)
    return make_workspace(tmp_path / "project")


def test_a_workspace_is_a_worktree_with_the_runs_params_and_the_projects_dvc_stores(project):
    (project / "pipeline" / "note.py").write_text("# uncommitted\n")  # a developer's change travels along
    ws = workspace.create(project, "manual__2026-11-29T02:00:00+00:00", {"train.epochs": 3})
    assert ws.root == project / "runs" / "manual__2026-11-29T02-00-00-00-00"
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert params["train"]["epochs"] == 3
    assert params["data"]["landing"] == str(project / "data" / "landing")  # the project's data, not a copy
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 8  # untouched
    assert (ws.root / "pipeline" / "note.py").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ws.root, capture_output=True, text=True).stdout
    assert "params.yaml" in status  # so the MLflow run records git_dirty truthfully
    dvc = [sys.executable, "-m", "dvc"]
    cache = subprocess.run([*dvc, "cache", "dir"], cwd=ws.root, capture_output=True, text=True).stdout.strip()
    assert cache == str(project / ".dvc" / "cache")
    remotes = subprocess.run([*dvc, "remote", "list"], cwd=ws.root, capture_output=True, text=True).stdout
    assert str(project / "dvc-remote") in remotes
    # asking again (a later task, a retry) returns the same workspace and keeps its record
    again = workspace.create(project, "manual__2026-11-29T02:00:00+00:00", {"train.epochs": 99})
    assert again.root == ws.root and again.record["overrides"] == {"train.epochs": 3}
    assert workspace.latest(project) == ws.root


@pytest.mark.parametrize("overrides, key", [
    ({"train.epochs": 0}, "train.epochs"),
    ({"model.type": "forest"}, "model.type"),
    ({"data.landing": "no/such/folder"}, "data.landing"),
    ({"trian.epochs": 3}, "trian"),
])
def test_refused_overrides_make_nothing(project, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        workspace.create(project, "manual__bad", overrides)
    assert not (project / "runs" / "manual__bad").exists()
    assert "manual__bad" not in subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True,
                                               text=True).stdout


def test_only_the_newest_workspaces_are_kept(project):
    made = [workspace.create(project, f"run-{i}").root for i in range(4)]
    removed = workspace.prune(project, keep=2)
    assert sorted(removed) == sorted(made[:2])
    assert [p.exists() for p in made] == [False, False, True, True]
    listed = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert "run-0" not in listed and "run-3" in listed
