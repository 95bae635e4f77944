"""The scratch project maker: a self-contained copy of this project in a folder of its own.

The tests' workspaces (tests/conftest.py) and the benchmarks' (benchmarks/common.py imports
these from here) are made by the same code, so both run the code exactly as a user's
checkout would: `python -m pipeline run` in the copy.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def deep_update(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into ``base`` key by key (nested dicts merged, other values replaced)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def make_project(root: Path, params: dict | None = None) -> Path:
    """A self-contained copy of the project: code, dvc.yaml, params.yaml (the project's, with
    ``params`` merged in), its own git and DVC repositories and a local DVC remote. No data.

    The code copied is pipeline.code_changes.CODE_FOLDERS, what a run records as the project's code.
    """
    import yaml

    from pipeline.code_changes import CODE_FOLDERS

    root.mkdir(parents=True, exist_ok=True)
    for name in CODE_FOLDERS:
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, root / name)
    merged = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), params or {})
    (root / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"], [*dvc, "config", "core.analytics", "false"],
                    [*dvc, "remote", "add", "-d", "local", str(root / "dvc-remote")], ["git", "add", "-A"],
                    ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-q",
                     "-m", "workspace"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root
