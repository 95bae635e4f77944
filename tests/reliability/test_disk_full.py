"""Fault catalogue 12: the disk fills up, or the output folder cannot be written, during preprocess.

Each case runs ``dvc repro preprocess`` (as the pipeline and the Airflow task do) in a copy of one
validated workspace, with a real fault of the file system:

- file size limit: RLIMIT_FSIZE (``ulimit -f``) on the stage's process, so writing the arrays
  fails with EFBIG (Python ignores SIGXFSZ, so it is an OSError, as on a size-capped disk);
- disk full: the output folder on a 64 KiB tmpfs, so reserving the arrays fails with ENOSPC;
- read-only: the output folder on a read-only tmpfs (EROFS); as root, chmod would not stop a write.

The mount cases need root and mount(2) (they skip, saying so, where mounting is not allowed).
Expected: a non-zero exit with one line ``error: preprocess: cannot write <path>: <why>``, no
output under its real name, no temporary file left behind, no dvc.lock entry for preprocess
(``dvc status`` shows it as not done), and once the fault is gone a rerun gives the same bytes
as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import make_workspace, set_params

pytestmark = pytest.mark.slow

SIZE_LIMIT = 64 * 1024  # bytes: below the train split's array


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    path = os.pathsep.join(str(p) for p in (bin_dir, Path(sys.executable).parent) if p)
    env = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ.get('PATH', '')}"}
    for inherited in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_ARTIFACT_ROOT"):
        env.pop(inherited, None)
    return env


def _capped_python(folder: Path, limit: int) -> Path:
    """A ``python`` that runs the real one under RLIMIT_FSIZE (``ulimit -f``): DVC runs the
    stage's ``python -m pipeline preprocess`` through it, while DVC's own database is not capped."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(f"#!{sys.executable}\n"
                    "import os, resource, sys\n"
                    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
                    f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    shim.chmod(0o755)
    return folder


def _dvc(root: Path, *args: str, stage_file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    bin_dir = _capped_python(root.with_name(root.name + "-bin"), stage_file_size_limit) \
        if stage_file_size_limit else None
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(bin_dir), capture_output=True,
                          text=True, timeout=300)


def _lock(root: Path) -> dict:
    path = root / "dvc.lock"
    return yaml.safe_load(path.read_text())["stages"] if path.is_file() else {}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root and mount(2)")


def _remount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True)


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> tuple[Path, dict[str, bytes], dict]:
    """A workspace after ingest + validate, and what an uninterrupted preprocess makes of it."""
    base = make_workspace(tmp_path_factory.mktemp("disk-full") / "base")
    done = _dvc(base, "repro", "validate")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = base.with_name("reference")
    shutil.copytree(base, reference, symlinks=True)
    done = _dvc(reference, "repro", "preprocess")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = _files(reference / "data" / "processed")
    assert set(expected) == {"train_images.npy", "calibration_images.npy", "test_images.npy", "index.parquet"}
    assert len(expected["train_images.npy"]) > SIZE_LIMIT * 2
    return base, expected, _lock(reference)["preprocess"]


def _file_size_limit(root: Path):
    """Every write of the DVC process tree is capped (ulimit -f); removing the cap is the fix."""
    return "data/processed", {"stage_file_size_limit": SIZE_LIMIT}, "the file would exceed the file size limit", None


def _disk_full(root: Path):
    _mount(root / "vol", "size=64k")
    set_params(root, paths={"processed": "vol/processed"})
    return "vol/processed", {}, "the disk is full", lambda: _remount(root / "vol", "size=16m")


def _read_only(root: Path):
    _mount(root / "vol", "ro,size=16m")
    set_params(root, paths={"processed": "vol/processed"})
    return "vol/processed", {}, "the file system is read-only", lambda: _remount(root / "vol", "rw")


@pytest.mark.parametrize("fault", [_file_size_limit, _disk_full, _read_only],
                         ids=lambda f: f.__name__.strip("_"))
def test_preprocess_fails_cleanly_and_a_rerun_gives_the_same_bytes(validated, tmp_path, fault):
    base, expected, reference_lock = validated
    root = tmp_path / f"ws-{uuid.uuid4().hex[:6]}"
    shutil.copytree(base, root, symlinks=True)
    processed, limits, why, fix = fault(root)
    try:
        before = _lock(root)
        assert "preprocess" not in before and "validate" in before

        failed = _dvc(root, "repro", "preprocess", **limits)
        output = failed.stdout + failed.stderr
        assert failed.returncode != 0, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: preprocess: cannot write {processed}"), output
        assert why in errors[0] and f"nothing was written under {processed}" in errors[0], errors[0]
        assert "Traceback" not in output, output
        assert "failed to reproduce 'preprocess'" in output

        target = root / processed
        assert not target.exists(), f"{processed} exists after a failed write: {list(target.rglob('*'))}"
        if target.parent.is_dir():
            assert [p.name for p in target.parent.iterdir() if ".tmp" in p.name] == [], "a temporary file was left"
        assert _lock(root) == before, "dvc.lock changed although preprocess failed"
        status = _dvc(root, "status", "preprocess", "--json")
        assert status.returncode == 0 and "preprocess" in json.loads(status.stdout), status.stdout
        print(errors[0], status.stdout, sep="\n")  # shown with -s: what an operator sees

        if fix is not None:
            fix()
        rerun = _dvc(root, "repro", "preprocess")
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert _files(target) == expected, "the rerun's arrays differ from an uninterrupted run's"
        assert [o["md5"] for o in _lock(root)["preprocess"]["outs"]] == [o["md5"] for o in reference_lock["outs"]]
        assert json.loads(_dvc(root, "status", "preprocess", "--json").stdout) == {}  # up to date now
    finally:
        if (root / "vol").is_dir() and os.path.ismount(root / "vol"):
            subprocess.run(["umount", "-l", str(root / "vol")], check=False)
