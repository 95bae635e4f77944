"""dvc.yaml -> the stage graph, for everything that schedules stages (the Airflow DAG).

dvc.yaml is the one source of truth: a stage's upstreams are the stages whose
outputs it depends on, exactly as DVC itself reads it. Only yaml is imported, so a
DAG file can call this while it is parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

_TEMPLATE = re.compile(r"\$\{([^}]+)\}")


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: tuple[str, ...]


def _entries(items) -> list[str]:
    return [next(iter(item)) if isinstance(item, dict) else str(item) for item in items or []]


def _resolve(text: str, params: dict) -> str:
    def lookup(match: re.Match) -> str:
        node = params
        for part in match.group(1).strip().split("."):
            node = node[part]
        return str(node)

    return _TEMPLATE.sub(lookup, text)


def _covers(out: str, dep: str) -> bool:
    """Overlapping paths link two stages, as in DVC: a dependency on a file inside an output
    folder, or on a folder that holds an output."""
    out, dep = out.rstrip("/"), dep.rstrip("/")
    return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")


def stages(root: Path) -> list[Stage]:
    """The stages of ``root/dvc.yaml`` in file order, each with the stages it reads from."""
    root = Path(root)
    params = yaml.safe_load((root / "params.yaml").read_text()) or {}
    body = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    result: list[Stage] = []
    for name, stage in body.items():
        deps = tuple(_resolve(d, params) for d in _entries(stage.get("deps")))
        outs = tuple(_resolve(o, params) for key in ("outs", "metrics", "plots") for o in _entries(stage.get(key)))
        upstream = tuple(dict.fromkeys(
            earlier.name for dep in deps for earlier in result if any(_covers(out, dep) for out in earlier.outs)))
        result.append(Stage(name=name, cmd=str(stage.get("cmd", "")), deps=deps, outs=outs, upstream=upstream))
    return result


def edges(root: Path) -> set[tuple[str, str]]:
    return {(up, stage.name) for stage in stages(root) for up in stage.upstream}
