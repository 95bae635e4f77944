"""`python -m pipeline reproduce`: any registered model rebuilt from its record.

One workspace, two registered versions: v1 from a clean commit, v2 from a later
commit plus an uncommitted code change. Each change adds a key to metrics.json, so a
rebuild from the wrong code shows up as a mismatch in the table.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_workspace, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

EVALUATE = Path("pipeline/stages/evaluate.py")
ANCHOR = '    metrics["calibration_method"] = calibration["method"]\n'


def _add_metric(root: Path, key: str) -> None:
    path = root / EVALUATE
    text = path.read_text()
    assert ANCHOR in text
    path.write_text(text.replace(ANCHOR, ANCHOR + f'    metrics["{key}"] = 1\n'))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("reproduce") / "project")
    run_cli(root, "run")  # v1 at the first commit, clean
    _add_metric(root, "head_moved")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qam",
                    "evaluate: one more metric"], cwd=root, check=True)
    _add_metric(root, "uncommitted")  # v2: the new commit and a change nobody committed
    run_cli(root, "run")
    return root


def _rows(stdout: str) -> dict[str, str]:
    """name -> verdict, from the printed table."""
    out = {}
    for line in stdout.splitlines():
        for verdict in ("MISMATCH", "ok"):
            if line.rstrip().endswith(verdict):
                out[line.split("  ")[0].strip()] = verdict
    return out


def test_a_model_from_an_older_commit_is_rebuilt_from_that_commit(ws):
    result = run_cli(ws, "reproduce", "1")
    assert "reproduce: MATCH" in result.stdout
    rows = _rows(result.stdout)
    assert {"data version", "weights md5", "calibration threshold", "test auroc", "test average_precision",
            "test fpr"} <= set(rows)
    assert set(rows.values()) == {"ok"}
    assert "test head_moved" not in rows  # HEAD's code, which writes it, was not used
    assert not list((ws / "runs").glob("reproduce-*")), "the scratch worktree is removed"


def test_a_model_from_a_dirty_tree_is_rebuilt_with_its_recorded_patch(ws):
    result = run_cli(ws, "reproduce", "@champion")
    assert "anomaly-detector v2" in result.stdout and "applying its recorded patch" in result.stdout
    assert "reproduce: MATCH" in result.stdout
    rows = _rows(result.stdout)
    assert rows["test head_moved"] == "ok" and rows["test uncommitted"] == "ok"


def test_a_changed_record_is_a_mismatch_and_data_comes_back_from_the_remote(ws):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    run_id = MlflowClient(uri, uri).get_model_version("anomaly-detector", "1").run_id
    recorded = ws / "mlartifacts" / "anomaly-detector" / run_id / "artifacts" / "pipeline" / "metrics.json"
    metrics = json.loads(recorded.read_text())
    metrics["auroc"] = round(metrics["auroc"] - 0.01, 6)
    recorded.write_text(json.dumps(metrics))
    shutil.rmtree(ws / ".dvc" / "cache")  # the raw snapshot is only in the DVC remote now

    result = run_cli(ws, "reproduce", "1", check=False)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "reproduce: MISMATCH: test auroc differ" in result.stdout
    rows = _rows(result.stdout)
    assert rows["test auroc"] == "MISMATCH"
    assert rows["data version"] == rows["weights md5"] == rows["calibration threshold"] == "ok"


def test_an_unknown_reference_is_a_clear_error(ws):
    result = run_cli(ws, "reproduce", "99", check=False)
    assert result.returncode == 1
    assert "'99' is neither a version nor an alias of anomaly-detector" in result.stderr
