"""retrain_anomaly_detector: the nightly retraining, and the form to run it by hand.

One task per dvc.yaml stage, in dvc.yaml's order and with its edges (read from
dvc.yaml, the one source of truth for the stage graph), then ``register`` and
``promote``. Each stage task runs ``dvc repro --single-item <stage>`` in the run's
own workspace, so unchanged stages come from DVC's cache. All the work is in
pipeline.orchestrate; this file only schedules it, and imports nothing heavy.

Outcomes an operator sees:
- refused data: ``validate`` fails (no retry), its log names the GX report; nothing
  downstream runs and nothing is registered.
- failed gates: ``register`` succeeds, ``promote`` asks a person (a required action in the
  UI: keep the champion, or promote anyway with a reason; the champion stays if nobody answers
  within ``gates.approval_timeout_hours``). Kept, ``promote`` is *skipped*; its log and the model
  version's tags say which gate failed, by how much, and who decided what. The run succeeds.
- any failed task: a line in ``runs/failures.jsonl`` and the MLflow run marked FAILED.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

# The project whose pipeline this runs: the folder above dags/, unless set. It goes first
# on sys.path so that this checkout's own pipeline/ and dags/common.py are the ones used.
PROJECT = Path(os.environ.get("ANOMALY_PIPELINE_PROJECT") or Path(__file__).resolve().parents[1])
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from dags.common import CHAMPION, DRIFT, PARAMS, record_failure

from pipeline.deploy import PASSED_TO_POD, Kubernetes, train_placement
from pipeline.graph import stages
from pipeline.orchestrate import KEEP, PROMOTE_ANYWAY
from pipeline.trigger_form import form

# Where a retry can help: reading the landing folder (a network share), training (it
# resumes from its last checkpoint; a preempted GPU), and the registry (a server).
# Validation, calibration and evaluation are deterministic: a retry repeats the failure.
TASK_SETTINGS: dict[str, dict] = {
    "ingest": {"retries": 2, "execution_timeout": timedelta(minutes=30)},
    "validate": {"retries": 0, "execution_timeout": timedelta(minutes=30)},
    "preprocess": {"retries": 1, "execution_timeout": timedelta(hours=1)},
    "train": {"retries": 2, "execution_timeout": timedelta(hours=6), "pool": "gpu"},
    "calibrate": {"retries": 0, "execution_timeout": timedelta(minutes=15)},
    "evaluate": {"retries": 0, "execution_timeout": timedelta(minutes=30)},
    "register": {"retries": 3, "execution_timeout": timedelta(minutes=30)},
    "promote": {"retries": 3, "execution_timeout": timedelta(minutes=10)},
}
NEW_STAGE_SETTINGS = {"retries": 1, "execution_timeout": timedelta(hours=1)}

# The trigger form: what people change from the UI, and the params.yaml key each value
# overrides for that run only. Bounds, choices and descriptions are the typed config's and
# defaults params.yaml's (pipeline/trigger_form.py); only the promotion override is the form's own.
FORM: dict[str, tuple[str | None, Param]] = {
    name: (key, Param(default, **schema)) for name, (key, default, schema) in form(PARAMS).items()} | {
    "force_promote": (None, Param(
        False, type="boolean", title="Force promotion",
        description="make this model the champion even if gates fail (needs a reason)")),
    "force_reason": (None, Param(
        None, type=["null", "string"], maxLength=500, title="Reason for forcing",
        description="required with force promotion; recorded on the model version")),
}


def _overrides(params: dict) -> dict:
    return {key: params[name] for name, (key, _) in FORM.items() if key is not None and name in params}


def triggered_by(dag_run) -> str:
    """Who started this run, for the audit trail (the version's ``promoted_by``): the user who
    triggered it (UI, REST API, ``airflow dags trigger``, a backfill: Airflow 3.1+ records it
    on the DagRun as ``triggering_user_name``), or ``scheduler`` when the schedule did."""
    user = getattr(dag_run, "triggering_user_name", None)
    if user:
        return str(user)
    run_type = str(getattr(dag_run.run_type, "value", dag_run.run_type))
    if run_type == "scheduled":
        return "scheduler"
    if run_type == "asset_triggered":
        return "scheduler (asset event)"
    return f"unknown (a {run_type} run with no triggering user)"


def _prepare(context) -> None:
    """Check the trigger input and make the run's workspace and MLflow run (idempotent)."""
    from pipeline.orchestrate import PermanentFailure, prepare

    params, dag_run = context["params"], context["dag_run"]
    unknown = sorted(set(dag_run.conf or {}) - set(FORM))
    if unknown:  # Airflow passes conf keys it has no Param for straight through: a typo would be ignored
        raise AirflowFailException(f"unknown trigger parameter(s) {unknown}; the form has {sorted(FORM)}")
    try:
        prepare(PROJECT, context["run_id"], _overrides(params), force=bool(params.get("force_promote")),
                reason=str(params.get("force_reason") or ""),
                trigger=f"airflow-{getattr(dag_run.run_type, 'value', dag_run.run_type)}",
                triggered_by=triggered_by(dag_run))
    except PermanentFailure as error:
        raise AirflowFailException(str(error)) from None


@task
def run_stage(name: str, **context) -> dict:
    from pipeline.orchestrate import PermanentFailure, stage

    _prepare(context)
    try:
        return stage(PROJECT, context["run_id"], name)
    except PermanentFailure as error:
        raise AirflowFailException(str(error)) from None


def _train_pod(k8s: Kubernetes, settings: dict):
    """train as a Kubernetes pod (ANOMALY_PIPELINE_TRAIN_ON=kubernetes, pipeline/deploy.py): the
    project image runs the same stage command an in-process task runs, in the run's workspace
    on the project's volume, with the GPUs, node selector and tolerations from the settings.
    Imported here only: the provider takes seconds to import, and no other placement needs it."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s_models

    project = str(PROJECT)
    return KubernetesPodOperator(
        task_id="train", name="anomaly-pipeline-train", namespace=k8s.namespace, image=k8s.image,
        # the image's tini first, as its entrypoint (which cmds replaces): signals reach the stage,
        # and the processes under it are reaped
        cmds=["/usr/bin/tini", "--", "python", "-m", "pipeline"],
        arguments=["--params", f"{project}/params.yaml", "run-stage", "{{ run_id }}", "train"],
        container_resources=k8s_models.V1ResourceRequirements(limits={"nvidia.com/gpu": str(k8s.gpus)})
        if k8s.gpus else None,
        node_selector=k8s.node_selector or None,
        tolerations=[k8s_models.V1Toleration(**t) for t in k8s.tolerations] or None,
        volumes=[k8s_models.V1Volume(name="project", persistent_volume_claim=k8s_models.
                                     V1PersistentVolumeClaimVolumeSource(claim_name=k8s.project_claim)),
                 # a pod's /dev/shm is 64 MB; NCCL (train.devices > 1) needs more
                 k8s_models.V1Volume(name="dshm", empty_dir=k8s_models.V1EmptyDirVolumeSource(medium="Memory"))],
        volume_mounts=[k8s_models.V1VolumeMount(name="project", mount_path=project),
                       k8s_models.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        env_vars={"ANOMALY_PIPELINE_PROJECT": project,
                  **{name: os.environ[name] for name in PASSED_TO_POD if os.environ.get(name)}},
        env_from=[k8s_models.V1EnvFromSource(secret_ref=k8s_models.V1SecretEnvSource(name=k8s.secret))]
        if k8s.secret else None,
        get_logs=True, on_finish_action="delete_succeeded_pod", **settings)


def _stage_task(name: str):
    settings = TASK_SETTINGS.get(name, NEW_STAGE_SETTINGS)
    placement = train_placement(devices=int((PARAMS.get("train") or {}).get("devices") or 1)) \
        if name == "train" else None
    if placement and placement.kubernetes:
        return _train_pod(placement.kubernetes, settings)
    queue = {"queue": placement.queue} if placement and placement.queue else {}
    return run_stage.override(task_id=name, **queue, **settings)(name)


@task(task_id="register", **TASK_SETTINGS["register"])
def register(**context) -> dict:
    from pipeline.orchestrate import register as do_register

    return do_register(PROJECT, context["run_id"])


# promote's question when gates fail (see PromoteOrAsk); the timeout is the run's own setting
REASON = Param(None, type=["null", "string"], maxLength=500, title="Reason",
               description=f"required with '{PROMOTE_ANYWAY}': recorded on the model version with your name")


class PromoteOrAsk(HITLOperator):
    """promote: moves the champion when the gates passed, as before. When they failed it asks
    (Airflow's required actions, the REST API's hitlDetails): keep the champion, or promote anyway
    with a reason. Unanswered within gates.approval_timeout_hours, the champion stays.

    Nobody is asked (the champion stays, the task is skipped) when the timeout is 0, and in an
    ``airflow dags test`` run (``make run``): that loop never applies a timeout, so a question
    would hold the run, and ``make run``, for good; there the default answer applies at once."""

    def __init__(self, **kwargs) -> None:
        hours = float((PARAMS.get("gates") or {}).get("approval_timeout_hours", 24))
        kwargs.pop("params", None)  # the DAG's trigger form, which Airflow hands every task: not this question's
        super().__init__(subject="failed gates: keep the champion or promote anyway?",
                         options=[KEEP, PROMOTE_ANYWAY], defaults=[KEEP], multiple=False, params={"reason": REASON},
                         response_timeout=timedelta(hours=hours) if hours else None, **kwargs)

    def execute(self, context):
        from pipeline.orchestrate import approval_question, promote

        outcome = promote(PROJECT, context["run_id"])
        question = approval_question(PROJECT, context["run_id"], outcome)
        if outcome.get("promoted") or question is None:
            return _promoted(outcome, context)
        if "answered" in question:  # a try after the answer was recorded: apply it, do not ask again
            return self._apply(context, question["answered"])
        if getattr(context["dag_run"], "triggering_user_name", None) == "dag_test":  # what dag.test() records
            self.log.info("airflow dags test: nobody to ask; the default applies: %s", KEEP)
            return _promoted(outcome, context)
        self.subject, self.body = question["subject"], question["body"]
        self.response_timeout = timedelta(hours=question["timeout_hours"])
        return super().execute(context)

    def execute_complete(self, context, event):
        answer = super().execute_complete(context, event)
        return self._apply(context, _approval(answer["chosen_options"], answer.get("params_input"),
                                              answer.get("responded_by_user")))

    @staticmethod
    def _apply(context, approval: dict):
        from pipeline.orchestrate import PermanentFailure, promote

        try:
            return _promoted(promote(PROJECT, context["run_id"], approval=approval), context)
        except PermanentFailure as error:
            raise AirflowFailException(str(error)) from None


def _approval(chosen: list[str], params_input: dict | None, user: dict | None) -> dict:
    return {"decision": chosen[0], "reason": (params_input or {}).get("reason"),
            "by": (user or {}).get("name") or (user or {}).get("id") or "nobody: no answer in time, the default applied"}


def _promoted(outcome: dict, context) -> dict:
    """The champion moved: the CHAMPION Asset event (it schedules scoring). Else the task is skipped,
    its log saying why the champion stays."""
    if not outcome.get("promoted"):
        reasons = "; ".join(outcome.get("reasons", [])) or outcome.get("note", "")
        decided = outcome.get("approval")
        raise AirflowSkipException(f"v{outcome.get('version')} not promoted, the champion stays: {reasons}"
                                   + (f" ({decided['decision']!r}, by {decided['by']})" if decided else ""))
    context["outlet_events"][CHAMPION].extra = {"version": str(outcome["champion"]),
                                                "previous": str(outcome.get("previous") or "")}
    return outcome


@dag(
    dag_id="retrain_anomaly_detector",
    description="Nightly retraining of the anomaly detector: DVC stages, then MLflow register and gated promote",
    # No start_date: a DAG unpaused at noon waits for the next night instead of running
    # the one it "missed". Airflow 3.3 reads run_immediately=False like None: unpaused less
    # than a tenth of the interval (2.4 h for a nightly cron) after a cron time, it runs
    # that night's retraining at once, a late start rather than a skipped night.
    # ... or at once when the scoring DAG's drift alarm fires (the DRIFT Asset)
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(PARAMS.get("schedule", {}).get("cron", "0 2 * * *"), timezone="UTC",
                                       run_immediately=False),
        assets=[DRIFT]),
    catchup=False,
    max_active_runs=1,
    params={name: param for name, (_, param) in FORM.items()},
    default_args={
        "owner": "mlops",
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
        "on_failure_callback": record_failure,
    },
    tags=["anomaly-detection", "retraining", "dvc", "mlflow"],
    doc_md=__doc__,
)
def retrain_anomaly_detector():
    graph = stages(PROJECT)
    tasks = {s.name: _stage_task(s.name) for s in graph}
    for s in graph:
        for upstream in s.upstream:
            tasks[upstream] >> tasks[s.name]
    sinks = [s.name for s in graph if not any(s.name in other.upstream for other in graph)]
    registered = register()
    [tasks[name] for name in sinks] >> registered >> PromoteOrAsk(task_id="promote", outlets=[CHAMPION],
                                                                  **TASK_SETTINGS["promote"])


retrain_anomaly_detector()
