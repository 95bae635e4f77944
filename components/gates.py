"""Promotion gates: absolute bounds and bounds relative to the champion. Pure functions."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    value: float | None
    bound: float | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    return f"{value:.4f}" if math.isfinite(value) else f"{value} (not a finite number)"


def _number(value: Any) -> float | None:
    """A metric as a gate reads it: a value that is not a finite number (NaN from scores that
    were not numbers) is no measurement, so it counts as missing and never passes a bound."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def absolute_gates(candidate: dict[str, Any], min_auroc: float, min_average_precision: float,
                   max_fpr: float) -> list[Gate]:
    gates = []
    for metric, bound, higher in (("auroc", min_auroc, True), ("average_precision", min_average_precision, True),
                                  ("fpr", max_fpr, False)):
        raw = candidate.get(metric)
        value = _number(raw)
        if value is None:
            why = ("is not a finite number" if raw is not None else
                   "could not be computed on the test split (one class only?)")
            gates.append(Gate(f"{metric}_{'min' if higher else 'max'}", False, None, bound, f"{metric} {why}"))
            continue
        passed = value >= bound if higher else value <= bound
        relation = ">=" if higher else "<="
        gap = value - bound
        reason = (f"{metric} {_fmt(value)} {relation} {bound}" if passed else
                  f"{metric} {_fmt(value)} is {'below' if higher else 'above'} the {'minimum' if higher else 'maximum'}"
                  f" {bound} by {abs(gap):.4f}")
        gates.append(Gate(f"{metric}_{'min' if higher else 'max'}", bool(passed), float(value), bound, reason))
    return gates


def champion_gates(candidate: dict[str, Any], champion: dict[str, Any] | None,
                   bounds: dict[str, dict[str, Any]], champion_version: str | None = None) -> list[Gate]:
    """Not worse than the champion by more than a tolerance, per metric and direction.

    With no champion yet every such gate passes (the first model only has to meet the absolute bounds).
    """
    if champion is None:
        return [Gate(f"vs_champion_{m}", True, candidate.get(m), None, "no champion yet") for m in bounds]
    gates = []
    label = f"champion v{champion_version}" if champion_version else "the champion"
    for metric, bound in bounds.items():
        direction, tolerance = bound["direction"], float(bound.get("tolerance", 0.0))
        new, old = _number(candidate.get(metric)), _number(champion.get(metric))
        if new is None or old is None:  # a champion without the metric is no yardstick; a candidate must have it
            gates.append(Gate(f"vs_champion_{metric}", new is not None, new, old,
                              f"{metric}: candidate {_fmt(candidate.get(metric))}, {label} {_fmt(champion.get(metric))}"))
            continue
        limit = old - tolerance if direction == "higher" else old + tolerance
        passed = new >= limit if direction == "higher" else new <= limit
        if passed:
            reason = f"{metric} {_fmt(new)} vs {label} {_fmt(old)} (tolerance {tolerance})"
        else:
            reason = (f"{metric} {_fmt(new)} is worse than {label} {_fmt(old)} by {abs(new - old):.4f}, "
                      f"more than the tolerance {tolerance}")
        gates.append(Gate(f"vs_champion_{metric}", bool(passed), float(new), float(limit), reason))
    return gates


def summarise(gates: list[Gate]) -> dict[str, Any]:
    failed = [g for g in gates if not g.passed]
    return {
        "passed": not failed,
        "failed": [g.name for g in failed],
        "reasons": [g.reason for g in failed],
        "gates": [g.as_dict() for g in gates],
    }
