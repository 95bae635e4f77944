"""3. No-op rerun: the whole retraining again with nothing changed, against the first run.

Each repetition is a fresh scratch project with make run's data and params.yaml's
defaults: ``python -m pipeline run`` (the first night), then the same command again
(a night on which nothing changed). The second run must train nothing (DVC runs no
stage) and register nothing (register finds the champion has the same data, params,
code and weights), and take at most 20 % of the first run's time.
"""
from __future__ import annotations

import shutil

from benchmarks.common import PYTHON, Context, Figure, bench_env, check, ratios, run_child
from benchmarks.training import prepared_project

TITLE = "3. No-op rerun: the whole retraining a second time with nothing changed"


def _versions(root) -> int:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return len(MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='anomaly-detector'"))


def run(ctx: Context) -> list[Figure]:
    first, second, stages_run, added = [], [], [], []
    params = {"train": {"epochs": 2}} if ctx.quick else {}
    for repetition in range(min(ctx.repeats, 3)):  # a first run is a whole training: 3 pairs at most
        root = prepared_project(ctx, f"rerun-{repetition}", params, stages=())
        one = run_child([PYTHON, "-m", "pipeline", "run"], cwd=root, env=bench_env())
        versions = _versions(root)
        two = run_child([PYTHON, "-m", "pipeline", "run"], cwd=root, env=bench_env())
        first.append(one.seconds)
        second.append(two.seconds)
        stages_run.append(float(two.output.count("Running stage '")))
        added.append(float(_versions(root) - versions))
        ctx.log(f"  repetition {repetition + 1}: first {one.seconds:.1f} s, second {two.seconds:.1f} s")
        shutil.rmtree(root.parent, ignore_errors=True)
    return [
        Figure("rerun.first_s", "first run (trains, registers, promotes)", "s", first, higher_is_better=False,
               note="params.yaml defaults" if not ctx.quick else "2 epochs"),
        Figure("rerun.second_s", "second run, nothing changed", "s", second, higher_is_better=False),
        check(Figure("rerun.ratio", "second / first", "ratio", ratios(second, first), higher_is_better=False),
              at_most=0.2),
        check(Figure("rerun.stages_run", "stages the second run ran", "stages", stages_run), at_most=0),
        check(Figure("rerun.versions_added", "versions the second run registered", "versions", added), at_most=0),
    ]
