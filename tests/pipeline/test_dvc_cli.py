"""pipeline.dvc_cli: DVC with its run cache made safe for two runs at once.

The race it fixes is milliseconds wide (a run reads a stage's run-cache entries while another
run is writing one), so these tests set up its moment by hand: another process's entry still
being written, under DVC's temporary name, empty, and the newest file in the stage's folder.
Real DVC, real processes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env
from pipeline import dvc_cli

DVC = [sys.executable, "-m", "dvc"]
DVC_YAML = """\
stages:
  copy:
    cmd: python -c "open('out.txt', 'w').write(open('in.txt').read())"
    deps: [in.txt]
    outs: [out.txt]
"""


def _run(root: Path, *command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(list(command), cwd=root, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _run(root, *DVC, "init", "-q")
    _run(root, *DVC, "config", "core.analytics", "false")
    (root / "dvc.yaml").write_text(DVC_YAML)
    # what a run workspace made before pipeline/dvc_cli.py existed holds: an older pipeline
    # package, first on `python -m`'s path here (COMMAND names the module by its path)
    (root / "pipeline").mkdir()
    (root / "pipeline" / "__init__.py").write_text("")
    return root


def _in_flight_entry(root: Path) -> tuple[Path, Path]:
    """Run the stage on input "one", then on "two", then put "one" back: its next repro looks
    in the run cache for "one". Plant, in that entry's folder, what another run's DVC has
    just opened and not yet filled: an empty ``.<token>.tmp``, newer than the real entry."""
    runs = root / ".dvc" / "cache" / "runs"
    (root / "in.txt").write_text("one\n")
    _run(root, *DVC, "repro", "copy")
    (folder,) = {path.parent for path in runs.glob("*/*/*")}
    (root / "in.txt").write_text("two\n")
    _run(root, *DVC, "repro", "copy")
    (root / "in.txt").write_text("one\n")
    planted = folder / ".Kq3vW0aJtH2bXyZ1mN4pQw.tmp"
    planted.touch()
    later = time.time() + 5
    os.utime(planted, (later, later))
    return folder, planted


def test_a_run_that_reads_the_run_cache_leaves_another_runs_entry_in_progress_alone(repo):
    folder, planted = _in_flight_entry(repo)
    result = _run(repo, *dvc_cli.COMMAND, "repro", "copy")
    assert planted.exists(), "the other run's entry in progress was deleted under it"
    assert "Stage 'copy' is cached - skipping run" in result.stdout + result.stderr
    assert (repo / "out.txt").read_text() == "one\n"
    assert len([p for p in folder.iterdir() if not p.name.startswith(".")]) == 1


def test_plain_dvc_still_deletes_it(repo):
    """The bug pipeline.dvc_cli works around, in the DVC this project pins. When this test
    fails, DVC has fixed it: remove pipeline/dvc_cli.py and call ``python -m dvc`` again."""
    _, planted = _in_flight_entry(repo)
    result = _run(repo, *DVC, "repro", "copy")
    assert not planted.exists()
    assert "corrupted cache file" in result.stdout + result.stderr
