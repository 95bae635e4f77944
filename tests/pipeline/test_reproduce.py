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


def _client(ws: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(uri, uri)


EVIL = b"""diff --git a/pipeline/evil.py b/pipeline/evil.py
new file mode 100644
index 0000000..1111111
--- /dev/null
+++ b/pipeline/evil.py
@@ -0,0 +1 @@
+import os; os.system("echo pwned")
"""


def test_a_run_that_made_no_version_of_the_model_is_refused_and_says_what_it_is(ws):
    """Anyone who can log a run could otherwise have their patch applied and run here."""
    client = _client(ws)
    experiment = client.get_experiment_by_name("anomaly-detector").experiment_id
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    run_id = client.create_run(experiment, tags={"git_commit": commit, "git_dirty": "true"}).info.run_id
    client.log_text(run_id, EVIL.decode(), "pipeline/uncommitted.patch")

    refused = run_cli(ws, "reproduce", run_id, check=False)
    assert refused.returncode == 1, refused.stdout[-3000:]
    assert f"run {run_id} made no version of anomaly-detector" in refused.stderr
    assert "--any-run" in refused.stderr and "pipeline/evil.py" in refused.stderr  # what it would have applied
    assert "reproduce: running" not in refused.stdout and not list((ws / "runs").glob("reproduce-*"))

    # asked for explicitly, it says what it runs: the run, its commit, the patch and its files
    anyway = run_cli(ws, "reproduce", run_id, "--any-run", check=False)
    assert anyway.returncode == 1  # this run recorded no params: nothing to rebuild, and it says so
    assert f"run {run_id} (made no version of anomaly-detector; --any-run)" in anyway.stdout
    assert f"commit {commit[:12]}" in anyway.stdout and "patch of 1 file" in anyway.stdout
    assert "pipeline/evil.py" in anyway.stdout
    assert "did not record params.yaml" in anyway.stderr


def test_the_run_id_of_a_registered_version_is_that_version(ws):
    """v2 (v1's record was changed by the test above): its run id, its version, its patch."""
    run_id = _client(ws).get_model_version("anomaly-detector", "2").run_id
    result = run_cli(ws, "reproduce", run_id)
    assert f"anomaly-detector v2 (run {run_id})" in result.stdout
    assert "patch of 1 file" in result.stdout and "pipeline/stages/evaluate.py" in result.stdout
    assert "reproduce: MATCH" in result.stdout
