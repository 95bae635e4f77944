"""promote / rollback: the only ways the champion alias moves."""
from __future__ import annotations

import os

from pipeline import tracking
from pipeline.io import StageError, read_json
from pipeline.layout import Layout
from pipeline.secrets import scrub


def _airflow_owner() -> str | None:
    """In an Airflow task that did not say who triggered its run: the DAG's owner, named as
    such (it is a team, not the person who asked for the move). Outside Airflow: None, and
    the registry records the user running the command."""
    owner = os.environ.get("AIRFLOW_CTX_DAG_OWNER")
    return f"{owner} (dag owner; no triggering user recorded)" if owner else None


def _client(layout: Layout):
    from pipeline.registry import connect

    return connect(tracking.store(layout))


def _regate(layout: Layout, client, gates: dict, current: str) -> list[str]:
    """The champion moved to ``current`` after register gated this version: compare again,
    with the new champion re-scored on this run's test split; returns the failed reasons
    (and records them on the version, which no longer counts as having passed)."""
    from components import gates as gate_rules
    from pipeline.gating import compare
    from pipeline.kinds import kind_of
    from pipeline.registry import tag_version

    test, labels = kind_of(layout.config).test_inputs(layout)
    results, champion, note = compare(layout, gates["candidate_metrics"], current, test, labels)
    report = gate_rules.summarise(results)
    if champion is None:  # unlike at register, we know a champion took over: no comparison, no move
        report["failed"].append("vs_champion")
        report["reasons"].append(f"{note}; not promoted over a champion it could not be compared with")
    if not report["failed"]:
        return []
    reasons = report["reasons"]
    tag_version(client, layout.config.registry.model_name, str(gates["version"]), {
        "gate_status": "failed", "gates_failed": ",".join(report["failed"]), "gated_against": current,
        "gate_reasons": f"re-gated at promotion against v{current}: " + "; ".join(reasons)[:4800]})
    return reasons


def run(layout: Layout, version: str | None = None, force: bool = False, reason: str = "",
        actor: str | None = None) -> dict:
    """Promote the version that register just gated (or an explicit one).

    Without force, only a version whose gates all passed moves; with force a reason is
    required, and the version records that it was forced and why, and by whom: ``actor``
    (from Airflow, the user who triggered the run, or ``scheduler``), else the user running
    this command.
    """
    from pipeline.registry import PromotionError, promote

    name = layout.config.registry.model_name
    if force and not reason.strip():
        raise StageError("--force needs --reason: a forced promotion must say why")
    gates = read_json(layout.gates) if layout.gates.is_file() else None
    if version is None:
        if gates is None:
            raise StageError(f"no gate report at {layout.gates}: run register first, or name --version")
        version = gates["version"]
    same_report = bool(gates and str(gates.get("version")) == str(version))
    if same_report and gates.get("unchanged_of") and not force:
        return _unchanged(layout, str(version), gates)
    # a forced promotion of an unchanged model is recorded as forced: its gates are an older night's
    passed = same_report and bool(gates["passed"]) and not gates.get("unchanged_of")
    if not passed and not force:
        reasons = gates["reasons"] if same_report else \
            [f"no gate report for v{version}"]
        print(f"promote: {name} v{version} NOT promoted; the champion stays. Failed gates:")
        for line in reasons:
            print(f"  - {line}")
        return {"promoted": False, "version": str(version), "reasons": reasons}
    actor = actor or _airflow_owner()
    why = reason or "all gates passed"
    client = _client(layout)
    try:
        outcome = promote(client, name, str(version), reason=why, forced=force and not passed, actor=actor,
                          lock=tracking.promotion_lock(layout), gated_against=gates.get("gated_against") if passed
                          else None, recheck=(lambda current: _regate(layout, client, gates, current)) if passed
                          else None)
    except PromotionError as error:
        raise StageError(scrub(f"promote: {error}")) from None
    if not outcome.get("promoted") and outcome.get("reasons"):
        print(f"promote: {name} v{version} NOT promoted; the champion moved to v{outcome['champion']} after "
              f"register compared against v{gates.get('gated_against')}, and against it:")
        for line in outcome["reasons"]:
            print(f"  - {line}")
        return {**outcome, "version": str(version)}
    print(f"promote: {name} champion -> v{outcome['champion']} (previous: {outcome.get('previous')})"
          + (" [FORCED: " + reason + "]" if force and not passed else ""))
    return {**outcome, "version": str(version)}


def record_approval(layout: Layout, version: str, decision: str, by: str, reason: str) -> None:
    """A person's answer to the question failed gates open (keep the champion, or promote anyway),
    on the version beside its gate tags: the decision, who gave it (or that the timeout did), why."""
    import time

    from pipeline.registry import tag_version

    tag_version(_client(layout), layout.config.registry.model_name, version, {
        "approval_decision": decision, "approved_by": by, "approval_reason": reason[:4800],
        "approval_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(f"promote: v{version}: {decision!r} by {by}" + (f": {reason}" if reason else ""))


def recorded_approval(layout: Layout, version: str) -> dict | None:
    """The answer :func:`record_approval` left on the version, or None: a task tried again after
    the answer was given applies it again instead of asking twice."""
    tags = _client(layout).get_model_version(layout.config.registry.model_name, version).tags
    if "approval_decision" not in tags:
        return None
    return {"decision": tags["approval_decision"], "by": tags.get("approved_by", ""),
            "reason": tags.get("approval_reason", "")}


def _unchanged(layout: Layout, version: str, gates: dict) -> dict:
    """Register found this run's model registered already as ``version``: nothing to move."""
    from pipeline.registry import CHAMPION, alias_version

    name = layout.config.registry.model_name
    champion = alias_version(_client(layout), name, CHAMPION)
    if champion == version:
        why = f"nothing changed since v{version}, which is the champion already"
    else:  # register counts only a twin that failed its gates against this same champion
        failed = "; ".join(gates.get("reasons") or []) or "its gates failed"
        why = f"nothing changed since v{version}, which failed its gates against champion v{champion}: {failed}"
    print(f"promote: {why}")
    return {"promoted": False, "version": version, "unchanged_of": version, "reasons": [why]}


def rollback(layout: Layout, reason: str) -> dict:
    from pipeline.registry import PromotionError, rollback as do_rollback

    try:
        outcome = do_rollback(_client(layout), layout.config.registry.model_name, reason=reason,
                              actor=_airflow_owner(),
                              lock=tracking.promotion_lock(layout))
    except PromotionError as error:
        raise StageError(scrub(f"rollback: {error}")) from None
    print(f"rollback: champion v{outcome['rolled_back_from']} -> v{outcome['champion']} by {outcome['by']}: {reason}")
    return outcome
