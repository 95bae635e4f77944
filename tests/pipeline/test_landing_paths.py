"""Issue 19, item 2: the landing folder reads only what it is allowed to.

``data.landing`` must resolve (symbolic links and ``..`` followed) into one of
``data.allowed_roots`` (default: the project's ``data/``), whether it comes from params.yaml
or from the trigger form; and ingest copies no symbolic link that leaves the landing folder,
nor a dangling one, nor a loop, nor anything that is not a plain file or folder.
Real files, real links (os.symlink), real FIFOs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace, run_cli
from pipeline import workspace
from pipeline.config import ConfigError, load, parse
from pipeline.io import EXIT_DATA_ERROR, DataError, StageError
from pipeline.layout import Layout
from pipeline.stages import ingest

ESCAPES = ["../../etc", "/etc", "/root", "data/../../outside", "data-evil/landing"]


def _project(root: Path, data: dict | None = None) -> Path:
    """A bare project: params.yaml (the given data section), data/landing, a folder beside it."""
    (root / "data" / "landing" / "batch-0001" / "good").mkdir(parents=True)
    (root / "data" / "landing" / "batch-0001" / "good" / "a.png").write_bytes(b"a")
    (root / "data-evil" / "landing").mkdir(parents=True)
    (root.parent / "outside").mkdir(exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"data": data or {}}))
    return root


@pytest.mark.parametrize("landing", ESCAPES)
def test_a_landing_outside_the_allowed_roots_is_refused_by_name(tmp_path, landing):
    project = _project(tmp_path / "project", {"landing": landing})
    with pytest.raises(ConfigError) as error:
        load(project / "params.yaml", check_landing=True)
    message = str(error.value)
    assert "data.landing" in message and "data.allowed_roots" in message, message
    assert str((project / "data").resolve()) in message, message  # the allowed root, resolved, is named


def test_a_landing_that_is_a_link_out_of_the_data_folder_is_refused(tmp_path):
    """data/landing itself a link to a folder elsewhere: the real path counts, not the name."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", project / "data" / "landing")
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {}}))
    with pytest.raises(ConfigError, match=r"data\.landing.*resolves to .*elsewhere.*data\.allowed_roots"):
        load(project / "params.yaml", check_landing=True)
    # allowing the real folder (absolute, or relative to the project) lets it through
    for root in (str(tmp_path / "elsewhere"), "../elsewhere"):
        (project / "params.yaml").write_text(yaml.safe_dump({"data": {"allowed_roots": ["data", root]}}))
        assert load(project / "params.yaml", check_landing=True).data.allowed_roots == ["data", root]


def test_landings_inside_an_allowed_root_are_accepted(tmp_path):
    project = _project(tmp_path / "project")
    assert load(project / "params.yaml", check_landing=True).data.allowed_roots == ["data"]  # the default
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"landing": "data/../data/landing"}}))
    load(project / "params.yaml", check_landing=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"landing": str(project / "data" / "landing")}}))
    load(project / "params.yaml", check_landing=True)
    # an allowed root is matched by path, not by the text it starts with: data-evil is not data
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"landing": "data-evil/landing",
                                                                  "allowed_roots": ["data-evil"]}}))
    load(project / "params.yaml", check_landing=True)


def test_allowed_roots_must_name_folders():
    for bad in ([], [""]):
        with pytest.raises(ConfigError, match="data.allowed_roots: .*needs at least one folder"):
            parse({"data": {"allowed_roots": bad}})


def test_ingest_checks_the_allowed_roots_itself(tmp_path):
    """However the config was loaded (a stage run by hand, a test), ingest reads no folder outside them."""
    project = _project(tmp_path / "project")
    (tmp_path / "outside" / "batch" / "good").mkdir(parents=True)
    (tmp_path / "outside" / "batch" / "good" / "secret.png").write_bytes(b"secret")
    layout = Layout(project, parse({"data": {"landing": str(tmp_path / "outside")}}))
    with pytest.raises(StageError, match=r"data\.landing.*data\.allowed_roots"):
        ingest.run(layout)
    assert not layout.raw.exists()


@pytest.fixture(scope="module")
def run_project(tmp_path_factory) -> Path:
    """A project with one tiny batch, for workspaces (refused ones leave nothing behind)."""
    return make_workspace(tmp_path_factory.mktemp("landing-paths") / "project")


@pytest.mark.parametrize("landing", ["../../etc", "/etc", "/root"])
def test_the_trigger_forms_landing_goes_through_the_same_check(run_project, landing, monkeypatch):
    """dags/retrain_anomaly_detector.py passes the form's landing as the data.landing override of
    workspace.create: refused with the key and the allowed roots, and nothing is made."""
    monkeypatch.delenv(workspace.RUNS_ENV, raising=False)
    with pytest.raises(ConfigError) as error:
        workspace.create(run_project, "manual__escape", {"data.landing": landing})
    assert "data.landing" in str(error.value) and "data.allowed_roots" in str(error.value)
    assert not (run_project / "runs" / "manual__escape").exists()


def test_a_run_workspace_keeps_the_projects_allowed_roots(run_project, monkeypatch):
    """The run's copy of params.yaml holds the project's roots made absolute (its own data/ is empty)."""
    monkeypatch.delenv(workspace.RUNS_ENV, raising=False)
    ws = workspace.create(run_project, "manual__allowed")
    params = yaml.safe_load((ws.root / "params.yaml").read_text())
    assert params["data"]["allowed_roots"] == [str(run_project / "data")]
    load(ws.root / "params.yaml", check_landing=True)


def _landing(tmp_path: Path) -> tuple[Layout, Path]:
    project = tmp_path / "project"
    good = project / "data" / "landing" / "batch-0001" / "good"
    good.mkdir(parents=True)
    (good / "a.png").write_bytes(b"image a")
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {}}))
    return Layout(project, load(project / "params.yaml", check_landing=True)), good


def test_ingest_refuses_every_link_that_leaves_the_landing_folder_by_name(tmp_path):
    layout, good = _landing(tmp_path)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key.png").write_bytes(b"private key")
    os.symlink("/etc/passwd", good / "passwd.png")                          # a file link, absolute
    os.symlink("../../../../../secrets/key.png", good / "key.png")          # a file link, relative
    os.symlink(tmp_path / "secrets", layout.landing / "batch-0001" / "spot")  # a folder link
    os.symlink("/etc", layout.landing / "batch-etc")                        # a whole batch
    with pytest.raises(DataError) as error:
        ingest.run(layout)
    message = str(error.value)
    for name, target in (("batch-0001/good/passwd.png", "/etc/passwd"),
                         ("batch-0001/good/key.png", str(tmp_path / "secrets" / "key.png")),
                         ("batch-0001/spot", str(tmp_path / "secrets")), ("batch-etc", "/etc")):
        assert f"{name} -> {target}" in message, message
    assert "leaves the landing folder" in message
    assert not layout.raw.exists(), "a refused landing must leave no snapshot"


def test_ingest_names_a_dangling_link(tmp_path):
    layout, good = _landing(tmp_path)
    os.symlink(tmp_path / "gone.png", good / "gone.png")
    with pytest.raises(DataError, match=r"batch-0001/good/gone\.png -> .*gone\.png: a dangling link"):
        ingest.run(layout)
    assert not layout.raw.exists()


def test_links_inside_the_landing_folder_are_copied_as_files_and_a_loop_is_refused(tmp_path):
    layout, good = _landing(tmp_path)
    os.symlink("a.png", good / "alias.png")                                  # a file link inside
    os.symlink("batch-0001", layout.landing / "batch-0002")                  # a folder link inside
    ingest.run(layout)
    raw = layout.raw
    assert sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()) == [
        "batch-0001/good/a.png", "batch-0001/good/alias.png", "batch-0002/good/a.png", "batch-0002/good/alias.png"]
    assert not any(p.is_symlink() for p in raw.rglob("*")), "the snapshot holds plain files only"
    assert (raw / "batch-0002" / "good" / "alias.png").read_bytes() == b"image a"

    os.symlink("..", good / "up")                                            # a loop: its own ancestor
    with pytest.raises(DataError, match=r"batch-0001/good/up -> .*: a loop"):
        ingest.run(layout)


def test_ingest_refuses_what_is_not_a_plain_file_or_folder(tmp_path):
    layout, good = _landing(tmp_path)
    os.mkfifo(good / "pipe.png")  # a FIFO would block a reader forever
    with pytest.raises(DataError, match=r"batch-0001/good/pipe\.png: not a plain file or folder"):
        ingest.run(layout)


def test_the_ingest_command_refuses_a_link_out_without_retry(run_project):
    """As DVC and Airflow run it: exit EXIT_DATA_ERROR (no retry), the file named on stderr."""
    link = run_project / "data" / "landing" / "batch-0001" / "good" / "passwd.png"
    os.symlink("/etc/passwd", link)
    try:
        result = run_cli(run_project, "ingest", check=False)
    finally:
        link.unlink()
    assert result.returncode == EXIT_DATA_ERROR, result.stdout + result.stderr
    assert "batch-0001/good/passwd.png -> /etc/passwd" in result.stdout + result.stderr
    assert not (run_project / "data" / "raw").exists()


def test_validate_refuses_a_link_out_of_a_hand_made_snapshot(tmp_path):
    """Ingest writes no link into data/raw; a raw folder made by hand with one is refused by
    validate as bad data (no retry), naming the link, instead of reading where it points."""
    from pipeline.stages import validate

    layout, good = _landing(tmp_path)
    ingest.run(layout)
    os.symlink("/etc/passwd", layout.raw / "batch-0001" / "good" / "passwd.png")
    with pytest.raises(DataError, match=r"batch-0001/good/passwd\.png -> /etc/passwd: a link that leaves"):
        validate.run(layout)
