"""A run's workspace: its own worktree and params, the project's DVC cache and remote,
and nothing made when the trigger's values are refused."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import make_workspace
from pipeline import tracking, workspace
from pipeline.config import ConfigError


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv(workspace.RUNS_ENV, raising=False)
    return make_workspace(tmp_path / "project")


def test_a_workspace_is_a_worktree_with_the_runs_params_and_the_projects_dvc_stores(project):
    # a developer's changes travel along: untracked, staged, and a staged deletion
    (project / "pipeline" / "note.py").write_text("# untracked\n")
    (project / "pipeline" / "staged.py").write_text("# staged\n")
    subprocess.run(["git", "add", "pipeline/staged.py"], cwd=project, check=True)
    subprocess.run(["git", "rm", "-q", "--cached", ".dvcignore"], cwd=project, check=True)
    (project / ".dvcignore").unlink()
    ws = workspace.create(project, "manual__2026-11-29T02:00:00+00:00", {"train.epochs": 3})
    assert ws.root == project / "runs" / "manual__2026-11-29T02-00-00-00-00"
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert params["train"]["epochs"] == 3
    assert params["data"]["landing"] == str(project / "data" / "landing")  # the project's data, not a copy
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 8  # untouched
    assert (ws.root / "pipeline" / "note.py").is_file() and (ws.root / "pipeline" / "staged.py").is_file()
    assert not (ws.root / ".dvcignore").exists()
    # the MLflow run records the project's commit and dirtiness, not the copy's rewritten params.yaml
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert tracking.git_info(ws.root) == {"git_commit": head, "git_dirty": "true"}
    dvc = [sys.executable, "-m", "dvc"]
    cache = subprocess.run([*dvc, "cache", "dir"], cwd=ws.root, capture_output=True, text=True).stdout.strip()
    assert cache == str(project / ".dvc" / "cache")
    remote = subprocess.run([*dvc, "config", "remote.local.url"], cwd=ws.root, capture_output=True, text=True)
    assert remote.stdout.strip() == str(project / "dvc-remote")
    # asking again (a later task, a retry) returns the same workspace and keeps its record
    again = workspace.create(project, "manual__2026-11-29T02:00:00+00:00", {"train.epochs": 99})
    assert again.root == ws.root and again.record["overrides"] == {"train.epochs": 3}
    assert workspace.latest(project) == ws.root


def test_a_project_in_a_long_path_keeps_its_remote(tmp_path, monkeypatch):
    """`dvc remote list` wraps its table at 80 columns: a long remote path came back as a
    remote named "e" with the url "(default)", and every run workspace failed to start."""
    monkeypatch.delenv(workspace.RUNS_ENV, raising=False)
    project = make_workspace(tmp_path / ("a-long-folder-name-" * 4) / "project")
    assert len(str(project / "dvc-remote")) > 80
    ws = workspace.create(project, "manual__long", {})
    remote = subprocess.run([sys.executable, "-m", "dvc", "config", "remote.local.url"], cwd=ws.root,
                            capture_output=True, text=True)
    assert remote.stdout.strip() == str(project / "dvc-remote")


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


def test_a_clean_project_makes_a_clean_record(project):
    ws = workspace.create(project, "scheduled__nightly", {"train.epochs": 3})
    assert tracking.git_info(ws.root)["git_dirty"] == "false"  # though its params.yaml holds the overrides


def test_only_the_newest_workspaces_are_kept(project, monkeypatch):
    monkeypatch.setenv(workspace.KEEP_ENV, "3")
    made = [workspace.create(project, f"run-{i}").root for i in range(5)]
    assert [p.exists() for p in made] == [False, False, True, True, True]  # the newest 3, this one included


def test_prune_removes_worktrees_too(project):
    made = [workspace.create(project, f"run-{i}").root for i in range(4)]
    removed = workspace.prune(project, keep=2)
    assert sorted(removed) == sorted(made[:2])
    assert [p.exists() for p in made] == [False, False, True, True]
    listed = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert "run-0" not in listed and "run-3" in listed
