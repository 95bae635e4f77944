from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load, parse

PROJECT = Path(__file__).resolve().parents[2]


def test_project_params_parse_and_cover_every_section():
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    config = parse(raw)
    assert set(raw) == {"base", "paths", "data", "table", "validate", "preprocess", "model", "train", "calibration",
                        "evaluate", "gates", "registry", "score", "schedule"}
    assert config.flat()["model.type"] in ("autoencoder", "deep_sad", "classifier", "patchcore", "padim")


@pytest.mark.parametrize("section,values,key", [
    ("model", {"type": "transformer"}, "model.type"),
    ("model", {"backbone": "vgg16"}, "model.backbone"),
    ("model", {"layers": ["layer2"]}, "model.layers"),          # a ResNet's layer on lite0
    ("model", {"coreset_ratio": 0}, "model.coreset_ratio"),
    ("model", {"max_bank": 0}, "model.max_bank"),
    ("train", {"epochs": -1}, "train.epochs"),
    ("train", {"learning_rate": 0}, "train.learning_rate"),
    ("calibration", {"target_fpr": 1.5}, "calibration.target_fpr"),
    ("calibration", {"target_fpr": 0}, "calibration.target_fpr"),
    ("calibration", {"method": "magic"}, "calibration.method"),
    ("preprocess", {"image_size": 60}, "preprocess.image_size"),
    ("preprocess", {"split": {"train": 0.9, "calibration": 0.2, "test": 0.2}}, "preprocess.split"),
    ("train", {"epoch": 3}, "train.epoch"),
    ("validate", {"anomaly_ratio": [0.5, 0.1]}, "validate.anomaly_ratio"),
    ("registry", {"model_name": "bad name!"}, "registry.model_name"),
    ("data", {"kind": "video"}, "data.kind"),
    ("table", {"columns": {"amount": {"type": "numeric", "allowed": ["a"]}}}, "table.columns.amount"),
    ("table", {"columns": {"amount": {"type": "number"}}}, "table.columns.amount.type"),
    ("table", {"drift": {"quantiles": [0.5, 2]}}, "table.drift.quantiles"),
    ("table", {"label_column": "id", "key_column": "id"}, "label_column and key_column must differ"),
    ("table", {"label_column": "y", "columns": {"y": {}}}, "'y' is the label or key column"),
    ("table", {"columns": {"split": {}}}, "the pipeline adds columns of these names itself"),
    ("schedule", {"score_cron": "every half hour"}, "schedule.score_cron"),
    ("score", {"inbox": "data/in"}, "score.inbox"),
])
def test_bad_values_are_refused_with_the_key(section, values, key):
    with pytest.raises(ConfigError) as error:
        parse({section: values})
    assert key in str(error.value)


def test_credentials_in_the_tracking_uri_are_refused():
    with pytest.raises(ConfigError, match="registry.tracking_uri.*MLFLOW_TRACKING_PASSWORD") as error:
        parse({"registry": {"tracking_uri": "https://ops:s3cret@mlflow.example.invalid"}})
    assert "s3cret" not in str(error.value)  # the message goes to logs
    assert parse({"registry": {"tracking_uri": "https://mlflow.example.invalid"}}).registry.tracking_uri


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="trian"):
        parse({"trian": {"epochs": 3}})


def test_a_table_needs_its_feature_columns_declared():
    with pytest.raises(ConfigError, match="table.columns must declare the feature columns"):
        parse({"data": {"kind": "table"}})


def test_classifier_needs_labelled_anomalies():
    with pytest.raises(ConfigError, match="validate.min_anomalies"):
        parse({"model": {"type": "classifier"}, "validate": {"min_anomalies": 0}})


def test_missing_landing_folder_is_refused_before_any_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"landing": "no/such/folder"}}))
    with pytest.raises(ConfigError, match="data.landing"):
        load(params, check_landing=True)


def test_missing_or_malformed_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_params_yaml_shows_the_landing_allow_list_at_its_default():
    """Issue 19 (2): data.allowed_roots is in params.yaml, where an operator looks for it."""
    from pipeline.config import Data

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert raw["data"]["allowed_roots"] == Data().allowed_roots == ["data"]


def test_allowed_formats_are_pillows_names_and_nothing_else():
    """Issue 19 (6): the formats are the decoders run everywhere; a name Pillow does not know
    (JPG: Pillow's is JPEG) would refuse every such file, so it is refused here, by key."""
    assert parse({"validate": {"allowed_formats": ["png", "jpeg", "gif"]}}).validation.allowed_formats == [
        "PNG", "JPEG", "GIF"]
    for bad in (["PNG", "JPG"], []):
        with pytest.raises(ConfigError, match="validate.allowed_formats"):
            parse({"validate": {"allowed_formats": bad}})


def _marked_not_default(text: str) -> set[str]:
    """The dotted keys of params.yaml whose line's comment says "not the default"."""
    import re

    marked, stack = set(), []
    for line in text.splitlines():
        match = re.match(r"^( *)([A-Za-z_]\w*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        if "#" in line and "not the default" in line.split("#", 1)[1]:
            marked.add(".".join(name for _, name in stack))
    return marked


def test_params_yaml_holds_the_configs_defaults():
    """Issue 20 (6): a default is written once, in pipeline/config.py; params.yaml shows it, and
    differs only where its comment says so."""
    from pipeline.config import Config

    text = (PROJECT / "params.yaml").read_text()
    marked = _marked_not_default(text)
    assert marked == {"table.columns", "gates.min_average_precision", "gates.vs_champion"}
    defaults = Config().model_dump(mode="json", by_alias=True)
    raw = yaml.safe_load(text)

    def at(tree: dict, key: str):
        for part in key.split("."):
            tree = tree[part]
        return tree

    def leaves(prefix: str, value) -> list[str]:
        if isinstance(value, dict) and prefix not in marked:
            return [leaf for key, sub in value.items() for leaf in leaves(f"{prefix}.{key}" if prefix else key, sub)]
        return [prefix]

    keys = leaves("", raw)
    assert len(keys) > 60  # every section's keys, not a few
    assert {key: (at(raw, key), at(defaults, key)) for key in keys if at(raw, key) != at(defaults, key)} == {
        key: (at(raw, key), at(defaults, key)) for key in marked}  # and a comment that says so is true


@pytest.mark.parametrize("kind", ["image", "table"])
def test_the_forms_model_types_are_those_the_config_accepts_for_the_kind(kind):
    """The kind decides which families the trigger form offers (no branch in the DAG file),
    and the config refuses the others by key."""
    import typing

    from pipeline.config import Model
    from pipeline.trigger_form import form

    columns = {"amount": {"type": "numeric"}} if kind == "table" else {}

    def accepted(model_type: str) -> bool:
        try:
            parse({"data": {"kind": kind}, "table": {"columns": columns}, "model": {"type": model_type}})
        except ConfigError as error:
            assert "model.type" in str(error)
            return False
        return True

    offered = form({"data": {"kind": kind}})["model_type"][2]["enum"]
    assert offered == [t for t in typing.get_args(Model.model_fields["type"].annotation) if accepted(t)]
    assert ("patchcore" in offered) == (kind == "image")
