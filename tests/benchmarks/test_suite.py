"""The benchmark runner itself (its figures are not tested: benchmarks are not tests).

A quick run of one cheap benchmark must write results.json and RESULTS.md with the
median and range of every figure; a run of another keeps the first one's record; a
benchmark that raises is reported and makes the exit status non-zero without losing
the others.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.__main__ import markdown
from benchmarks.common import Figure, check, ratios

from conftest import PROJECT, clean_env


def test_figure_median_range_and_target():
    figure = check(Figure("x.ratio", "ratio", "ratio", [0.9, 1.2, 1.0]), at_least=0.95)
    record = figure.as_dict()
    assert (record["median"], record["min"], record["max"]) == (1.0, 0.9, 1.2)
    assert record["met"] is True and record["target"] == ">= 0.95"
    assert check(Figure("y", "y", "s", [3.0, 5.0]), at_most=2).met is False
    assert ratios([2.0, 3.0], [1.0, 0.0]) == [2.0]  # a zero denominator is dropped, not divided by


def test_markdown_shows_before_and_a_missed_target():
    results = {"machine": {"cpu": "test cpu", "cores": 2}, "benchmarks": {"training": {
        "title": "1. Training", "seconds": 1, "figures": [check(Figure("training.ratio", "stage / plain", "ratio",
                                                                       [0.5, 0.6]), at_least=0.95).as_dict()]}}}
    baseline = {"benchmarks": {"training": {"figures": [{"key": "training.ratio", "median": 0.25}]}}}
    table = markdown(results, baseline)
    assert "| stage / plain | 0.550 | 0.500–0.600 | ratio | 0.250 | >= 0.95 | **NO** |" in table


@pytest.mark.slow  # runs two benchmarks in children, one trains: 20 s of the fast set's 2 minutes
def test_a_quick_run_writes_results_and_keeps_earlier_records(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--only"]
    done = subprocess.run([*command, "gpu"], cwd=PROJECT, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    figures = {f["key"]: f for f in results["benchmarks"]["gpu"]["figures"]}
    assert figures["gpu.fp32_samples_per_s"]["median"] > 0 and figures["gpu.bf16_samples_per_s"]["median"] > 0
    assert results["quick"] is True and results["machine"]["cores"] >= 1
    table = (tmp_path / "RESULTS.md").read_text()
    assert "bf16 autocast" in table and "QUICK run" in table

    # a benchmark that cannot run (no landing data, no network: here a broken scratch) is
    # reported by name; the earlier record stays in the file
    broken = subprocess.run([*command, "rerun"], cwd=PROJECT, env=clean_env({"PATH": "/nonexistent"}),
                            capture_output=True, text=True, timeout=600)
    assert broken.returncode == 1 and "could not run: rerun" in broken.stderr
    results = json.loads(out.read_text())
    assert "error" in results["benchmarks"]["rerun"] and "figures" in results["benchmarks"]["gpu"]
