"""dvc.yaml and pipeline/layout.py must name the same files."""
from pathlib import Path

import yaml

from pipeline import graph
from pipeline.config import parse
from pipeline.layout import Layout

PROJECT = Path(__file__).resolve().parents[2]


def test_stage_order_and_outputs_match_the_layout():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    stages = graph.stages(PROJECT)  # dvc.yaml with ${...} resolved, as the Airflow DAG reads it
    assert [s.name for s in stages] == ["ingest", "validate", "preprocess", "train", "calibrate", "evaluate"]
    layout = Layout(PROJECT, parse(params))
    declared = {s.name: set(s.outs) for s in stages}

    def rel(path: Path) -> str:
        return path.relative_to(PROJECT).as_posix()

    expected = {
        "ingest": {rel(layout.raw)},
        "validate": {rel(layout.manifest), rel(layout.validation_html), rel(layout.validation_gx),
                     rel(layout.validation_summary)},
        "preprocess": {rel(layout.processed)},
        "train": {rel(layout.weights), rel(layout.spec), rel(layout.scores),
                  rel(layout.train_history), rel(layout.train_metrics)},
        "calibrate": {rel(layout.threshold), rel(layout.calibration_normals)},
        "evaluate": {rel(layout.plots), rel(layout.roc_points), rel(layout.metrics)},
    }
    assert declared == expected


def test_every_stage_depends_on_its_own_module_and_runs_it():
    graph = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for stage, body in graph.items():
        assert body["cmd"] == f"python -m pipeline {stage}"
        assert f"pipeline/stages/{stage}.py" in body["deps"]


def test_train_lists_every_train_param_that_changes_the_weights():
    """train's params are listed key by key so that checkpoint_every_s retrains nothing; a key
    added to config.Train later must be added to dvc.yaml too, or changing it would not retrain."""
    from pipeline.config import Train

    listed = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["train"]["params"]
    keys = {key.removeprefix("train.") for key in listed if key.startswith("train.")}
    assert "train" not in listed
    assert keys == set(Train.model_fields) - {"checkpoint_every_s"}


def test_the_cli_runs_dvc_yaml_stages_in_dvc_yaml_order():
    """The stage list has one source, dvc.yaml: ``pipeline run`` and ``python -m pipeline <stage>``
    (cli.STAGES) run exactly its stages, in its order."""
    from pipeline.cli import STAGES

    assert list(STAGES) == [s.name for s in graph.stages(PROJECT)]
