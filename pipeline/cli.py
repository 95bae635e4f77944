"""python -m pipeline <command>: every stage, the whole run, the champion, scoring, data.

Stages are what dvc.yaml calls; ``run`` is what people and schedulers call.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

STAGES = ("ingest", "validate", "preprocess", "train", "calibrate", "evaluate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", type=Path,
                        help="params file; its folder is the project root (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    run = sub.add_parser("run", help="whole retraining: dvc repro, register, gates, promote; prints a summary")
    run.add_argument("--force", action="store_true", help="promote even if gates fail (needs --reason)")
    run.add_argument("--reason", default="", help="why a promotion is forced (recorded on the version)")

    for stage in STAGES:
        sub.add_parser(stage, help=f"run the {stage} stage only (what dvc.yaml calls)")
    sub.add_parser("register", help="log the run and model to MLflow, register a version, evaluate the gates")
    in_run = sub.add_parser("run-stage", help="run one stage in an Airflow run's workspace, as its task does "
                                              "(what a Kubernetes training pod runs)")
    in_run.add_argument("run_id", help="the Airflow run id whose workspace (runs/<run>) the stage runs in")
    in_run.add_argument("stage", choices=STAGES)

    promote = sub.add_parser("promote", help="move the champion alias to a version whose gates passed")
    promote.add_argument("--version", default=None, help="model version (default: the one register just gated)")
    promote.add_argument("--force", action="store_true", help="promote even if gates failed (needs --reason)")
    promote.add_argument("--reason", default="", help="why (required with --force)")

    rollback = sub.add_parser("rollback", help="champion <- previous; records who and why")
    rollback.add_argument("--reason", required=True, help="why the champion is rolled back")

    reproduce = sub.add_parser("reproduce", help="rebuild a registered model from its recorded commit, params and "
                                                 "data; compare metrics and threshold; exit 1 on a mismatch")
    reproduce.add_argument("ref", help="model version (7), alias (@champion) or MLflow run id")
    reproduce.add_argument("--tolerance", type=float, default=None,
                           help="relative and absolute tolerance for metrics and threshold (default: exact on the "
                                "CPU, 1e-3 when either run trained on a GPU)")
    reproduce.add_argument("--keep", action="store_true", help="keep the rebuilt worktree (default: removed)")
    reproduce.add_argument("--any-run", action="store_true",
                           help="also rebuild a run that made no version of the model (its recorded code and patch "
                                "run here: only for runs you trust)")

    score = sub.add_parser("score", help="score a folder of PNG/JPEG images with the champion")
    score.add_argument("folder", type=Path)
    score.add_argument("--out", type=Path, default=None, help="CSV to write (file, anomaly_score, is_anomaly, ...)")
    score.add_argument("--model-uri", default=None, help="default: models:/<registry.model_name>@champion")

    incoming = sub.add_parser("score-incoming", help="score and archive what waits in score.incoming, exactly once "
                                                     "(what the score_with_champion DAG runs)")
    incoming.add_argument("--claim", default=None, help="name of this batch of results (default: a timestamp)")

    summary = sub.add_parser("summary", help="print the summary of the last Airflow run (runs/latest) again")
    summary.add_argument("--run", type=Path, default=None, help="a run's workspace folder (default: runs/latest)")
    summary.add_argument("--newer-than", type=float, default=None, metavar="EPOCH",
                         help="only a summary written after this time (seconds since 1970); else an error")

    airflow = sub.add_parser("airflow", help="the airflow CLI on the project-local AIRFLOW_HOME (.airflow/), "
                                             "set up on first use; e.g. 'airflow dags test retrain_anomaly_detector'")
    airflow.add_argument("airflow_args", nargs=argparse.REMAINDER, help="arguments for airflow")

    data = sub.add_parser("generate-data", help="write a synthetic batch into data.landing: surface images, or "
                                                "card transactions (a CSV file) when data.kind is table")
    data.add_argument("--batch", default=None, help="batch folder name (default: the next batch-NNNN)")
    data.add_argument("--seed", type=int, default=None, help="default: base.seed + batch number")
    data.add_argument("--good", type=int, default=500, help="normal images")
    data.add_argument("--per-defect", type=int, default=40, help="images of each defect kind")
    data.add_argument("--size", type=int, default=128, help="side in pixels")
    data.add_argument("--rows", type=int, default=5000, help="data.kind table: transactions in the batch")
    data.add_argument("--fraud-rate", type=float, default=0.04, help="data.kind table: the share of fraud")
    data.add_argument("--if-empty", action="store_true", help="do nothing if the landing folder has a batch already")
    return parser


def _generate(layout, args) -> int:
    from components.synthetic import next_batch_name
    from pipeline.kinds import kind_of

    kind, landing = kind_of(layout.config), layout.landing
    if args.if_empty and landing.is_dir() and kind.has_data(landing):
        print(f"generate-data: {landing} already holds data; nothing written")
        return 0
    landing.mkdir(parents=True, exist_ok=True)
    name, number = next_batch_name(landing)
    seed = args.seed if args.seed is not None else layout.config.base.seed + number
    print(f"generate-data: {kind.generate(landing, args.batch or name, seed, args)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    args = _parser().parse_args(argv)
    if args.command == "airflow":
        from pipeline import airflow_local

        return airflow_local.main(args.params.resolve().parent, args.airflow_args)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # progress bars garble logs
    from pipeline.tracking import client_env

    for name, value in client_env(os.environ.get("MLFLOW_TRACKING_URI", "")).items():
        os.environ.setdefault(name, value)  # no run link that holds a password
    import warnings

    # MLflow asks for type hints on predict; the model's explicit signature is its contract
    warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.secrets import ScrubbingFormatter, scrub

    for handler in logging.getLogger().handlers:  # a library's log line may name the tracking URL
        if not isinstance(handler.formatter, ScrubbingFormatter):
            handler.setFormatter(ScrubbingFormatter(handler.formatter))
    for noisy in ("alembic", "mlflow.store.db.utils", "urllib3", "git", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from pipeline.config import ConfigError, load
    from pipeline.io import EXIT_DATA_ERROR, DataError, StageError
    from pipeline.layout import Layout

    try:
        config = load(args.params, check_landing=args.command in ("run", "ingest"))
        layout = Layout(root=args.params.resolve().parent, config=config)
        command = args.command
        if command == "generate-data":
            return _generate(layout, args)
        if command == "summary":
            from pipeline import orchestrate, run_record

            found = orchestrate.summary(layout.root, args.run)
            if found is None:
                raise StageError("no run summary yet: runs/latest has none (did the run start?)")
            run_layout, summary = found
            if args.newer_than is not None and run_layout.run_summary.stat().st_mtime < args.newer_than:
                raise StageError("the run stopped before it wrote a summary (the last one is older); "
                                 "see the Airflow log (make run prints its path) and runs/failures.jsonl")
            with orchestrate.environ(orchestrate.store_env(layout.root)):  # the project's store, not the run's
                run_record.print_summary(run_layout, summary)
            return 0 if summary["status"] == "finished" else 1
        if command == "run":
            from pipeline import runner

            if args.force and not args.reason.strip():
                raise StageError("--force needs --reason: a forced promotion must say why")
            return runner.run(layout, force=args.force, reason=args.reason)
        if command in STAGES or command == "register":
            import importlib

            importlib.import_module(f"pipeline.stages.{command}").run(layout)
            return 0
        if command == "run-stage":
            from pipeline import orchestrate

            orchestrate.stage(layout.root, args.run_id, args.stage)
            return 0
        if command == "promote":
            from pipeline.stages import promote

            outcome = promote.run(layout, version=args.version, force=args.force, reason=args.reason)
            return 0 if outcome.get("promoted") or outcome.get("note") else 3
        if command == "rollback":
            from pipeline.stages import promote

            promote.rollback(layout, args.reason)
            return 0
        if command == "reproduce":
            from pipeline import reproduce

            matched, _, _ = reproduce.reproduce(layout, args.ref, tolerance=args.tolerance, keep=args.keep,
                                                  any_run=args.any_run)
            return 0 if matched else 1
        if command == "score-incoming":
            import time

            from pipeline import score

            score.incoming(layout, args.claim or time.strftime("cli-%Y%m%dT%H%M%S"))
            return 0
        if command == "score":
            from pipeline import score

            score.run(layout, args.folder, args.out, args.model_uri)
            return 0
    except (ConfigError, StageError) as error:
        print(f"error: {scrub(error)}", file=sys.stderr)
        if isinstance(error, ConfigError):
            return 2
        return EXIT_DATA_ERROR if isinstance(error, DataError) else 1
    except Exception:  # Python would print it; scrubbed first, as MLflow's errors name the tracking URL
        import traceback

        print(scrub(traceback.format_exc()), end="", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")
