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
    assert ws.root == project / "runs" / workspace.key_of("manual__2026-11-29T02:00:00+00:00")
    assert ws.root.name.startswith("manual__2026-11-29T02-00-00-00-00-")  # readable, and its own
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


def _git_project_with_secrets(project):
    """A project whose working tree holds code changes and secrets side by side. Its
    .gitignore is the project's without the ``.env`` rules, so that what keeps the secrets
    out is the code that records the changes, not only .gitignore."""
    gitignore = project / ".gitignore"
    gitignore.write_text("".join(line for line in gitignore.read_text().splitlines(keepends=True)
                                 if ".env" not in line))
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam",
                    "no .env rules"], cwd=project, check=True)
    tracked = project / "components" / "metrics.py"
    tracked.write_text(tracked.read_text() + "\nTRACKED_CHANGE = 1\n")
    (project / "components" / "new_family.py").write_text("NEW_CODE = 1\n")
    secrets = {
        ".env": "MLFLOW_TRACKING_PASSWORD=root-secret-1\n",
        "pipeline/.env": "AWS_SECRET_ACCESS_KEY=sub-secret-2\n",
        "components/credentials.json": '{"token": "named-secret-3"}\n',
        "components/deploy.pem": "-----BEGIN PRIVATE KEY----- key-secret-4\n",
        "dags/.env.production": "FERNET_KEY=dotenv-secret-5\n",
    }
    for name, text in secrets.items():
        (project / name).write_text(text)
    (project / "scratch.py").write_text("OUTSIDE_CODE_FOLDERS = 1\n")  # not code the pipeline runs
    return secrets


def test_the_patch_holds_the_code_changes_and_no_secret(project):
    secrets = _git_project_with_secrets(project)
    patch = tracking.uncommitted_patch(project).decode()
    assert "TRACKED_CHANGE = 1" in patch and "b/components/new_family.py" in patch and "NEW_CODE = 1" in patch
    for name, text in secrets.items():
        assert name not in patch and text.strip().split("=")[-1] not in patch, name
    assert "scratch.py" not in patch
    # the patch applies to the commit and gives the code back
    subprocess.run(["git", "stash", "-q", "--include-untracked"], cwd=project, check=True)
    subprocess.run(["git", "apply", "--binary", "-"], cwd=project, input=patch.encode(), check=True)
    assert "TRACKED_CHANGE = 1" in (project / "components" / "metrics.py").read_text()
    assert (project / "components" / "new_family.py").read_text() == "NEW_CODE = 1\n"


def test_a_run_workspace_gets_the_code_changes_and_no_secret(project):
    secrets = _git_project_with_secrets(project)
    ws = workspace.create(project, "manual__secrets", {})
    assert "TRACKED_CHANGE = 1" in (ws.root / "components" / "metrics.py").read_text()
    assert (ws.root / "components" / "new_family.py").read_text() == "NEW_CODE = 1\n"
    for name in secrets:
        assert not (ws.root / name).exists(), name
    assert not (ws.root / "scratch.py").exists()
    contents = "\n".join(p.read_text(errors="replace") for p in ws.root.rglob("*")
                         if p.is_file() and ".git" not in p.parts and p.stat().st_size < 1_000_000)
    assert not any(text.strip().split("=")[-1] in contents for text in secrets.values())


@pytest.mark.parametrize("name", [".env", "pipeline/.env", "docker/.env", ".env.local", "components/deploy.pem",
                                  "id_rsa", "components/credentials.json", ".netrc"])
def test_gitignore_keeps_secrets_out_of_git_everywhere(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", name], cwd=root)
    assert ignored.returncode == 0, f"{name} is not ignored by .gitignore"


def test_an_example_env_file_is_not_ignored():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "docker/.env.example"], cwd=root).returncode == 1


@pytest.mark.parametrize("name, secret", [
    (".env", True), ("pipeline/.env", True), (".env.local", True), ("prod.env", True), ("dags/.ENV", True),
    ("components/deploy.pem", True), ("tls.key", True), ("id_ed25519.pub", True), (".netrc", True),
    (".aws/config", True), ("components/credentials.json", True), ("config/client_secret_1.json", True),
    ("secrets/settings.py", True),  # a folder named like a secret: everything in it
    ("docker/.env.example", False),  # a template documents the keys, it holds no secret
    ("pipeline/secrets.py", False), ("components/credential_scrub.py", False),  # code, needed to run
    ("components/metrics.py", False), ("dvc.yaml", False), ("pipeline/keys.py", False),
])
def test_which_names_count_as_secrets(name, secret):
    from pipeline.code_changes import is_secret

    assert is_secret(name) is secret


def test_two_run_ids_never_share_a_workspace_folder():
    """``:`` and ``+`` become ``-`` in a folder name: without more, these two ids were one folder."""
    one, two = "manual__2026-01-01T00:00:00+00:00", "manual__2026-01-01T00-00-00-00-00"
    assert workspace.key_of(one) != workspace.key_of(two)
    assert workspace.key_of(two) == two  # an id that is a fine folder name already stays as it is
    assert workspace.key_of(one).startswith("manual__2026-01-01T00-00-00-00-00")  # and a changed one stays readable


def test_the_workspace_key_is_injective_readable_and_stable():
    import itertools
    import re

    stems = ["manual__2026-01-01T00:00:00+00:00", "scheduled__2026-03-04T02:00:00+00:00", "run", "", "-", ".", "a",
             "asset_triggered__2026-01-01T00:00:00.123456+00:00", "backfill__2026-01-01T00:00:00+00:00", "x y", "x/y",
             "../../etc", "ümlaut", "a" * 200]
    ids = {a + b for a, b in itertools.product(stems, ["", ":", "+", "-", "--", "/", " ", ".", "-", "-0123abcd",
                                                       "-deadbeef"])}
    ids |= {workspace.key_of(i) for i in ids}  # an id equal to another id's key
    keys = {i: workspace.key_of(i) for i in ids}
    assert len(set(keys.values())) == len(ids), "two run ids share a workspace folder"
    for run_id, key in keys.items():
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key) and key not in (".", ".."), key
        assert len(key) <= 255 and key == workspace.key_of(run_id)  # a folder name, the same every time
