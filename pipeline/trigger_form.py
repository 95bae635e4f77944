"""The retraining's trigger form, generated from the typed config: one source for parameters.

Each form field overrides one params.yaml key for one run. Its type, bounds, choices, title and
description are that pydantic field's JSON schema (pipeline/config.py), so the form accepts what
a run accepts and nothing else; its default is params.yaml's value; the model types offered are
those the data kind can train (pipeline/kinds' ``MODEL_TYPES``). Only pydantic and yaml are
imported, and not Airflow: the DAG file wraps each field in a Param while Airflow parses it.
"""
from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from pipeline.config import Config, Data
from pipeline.kinds import MODEL_TYPES

# form field -> the params.yaml key it overrides
FIELDS = {"model_type": "model.type", "epochs": "train.epochs", "learning_rate": "train.learning_rate",
          "calibration_method": "calibration.method", "target_fpr": "calibration.target_fpr",
          "landing": "data.landing"}
# the JSON schema keywords a form field keeps (Airflow validates with jsonschema and draws from them)
KEYWORDS = ("type", "enum", "anyOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
            "maxLength", "pattern", "title", "description")


def section(name: str) -> type[BaseModel]:
    """The pydantic model of a params.yaml section (``validate`` is the field ``validate_``)."""
    for field, info in Config.model_fields.items():
        if name in (field, info.alias):
            return info.annotation
    raise KeyError(f"params.yaml has no section {name!r}")


@cache
def _properties(model: type[BaseModel]) -> dict[str, dict]:
    return model.model_json_schema()["properties"]


def field_schema(key: str) -> dict[str, Any]:
    """The config field ``key`` (dotted, ``train.epochs``) as a form field's JSON schema."""
    part, name = key.split(".")
    schema = _properties(section(part))[name]
    return {word: schema[word] for word in KEYWORDS if word in schema}


def form(params: dict) -> dict[str, tuple[str, Any, dict[str, Any]]]:
    """Form field -> (params.yaml key, default, JSON schema) for ``params``, params.yaml as read
    (not validated: a bad value fails the run's own check, with the key's name, not the parse)."""
    data = params.get("data") or {}
    kind = data.get("kind") or Data.model_fields["kind"].default
    fields = {}
    for field, key in FIELDS.items():
        part, name = key.split(".")
        schema = field_schema(key)
        if key == "model.type":
            schema["enum"] = [choice for choice in schema["enum"] if choice in MODEL_TYPES.get(kind, schema["enum"])]
        if key == "data.landing":  # the folders of this project, where the operator needs them
            roots = data.get("allowed_roots") or Data.model_fields["allowed_roots"].default
            schema["description"] += f" (here: {', '.join(map(str, roots))})"
        default = (params.get(part) or {}).get(name, section(part).model_fields[name].default)
        fields[field] = (key, default, schema)
    return fields
