"""Where the train task runs is configuration (pipeline/deploy.py), read by the same DAG file:
in-process on a worker, on a Celery queue, or as a Kubernetes pod.

The Kubernetes variant is checked by the operator's own dry run: the pod spec it would
submit, rendered without a cluster (none can run here; nothing is mocked in its place).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.deploy import DeploymentError, train_placement

DAGS = Path(__file__).resolve().parents[2] / "dags"
PROJECT = DAGS.parent
K8S = {"ANOMALY_PIPELINE_TRAIN_ON": "kubernetes", "ANOMALY_PIPELINE_IMAGE": "registry.example.com/anomaly:1.4",
       "ANOMALY_PIPELINE_K8S_PROJECT_CLAIM": "anomaly-project", "ANOMALY_PIPELINE_K8S_NAMESPACE": "ml-train",
       "ANOMALY_PIPELINE_K8S_GPUS": "2",
       "ANOMALY_PIPELINE_K8S_NODE_SELECTOR": '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}',
       "ANOMALY_PIPELINE_K8S_TOLERATIONS": '[{"key": "dedicated", "operator": "Equal", "value": "gpu", '
                                           '"effect": "NoSchedule", "tolerationSeconds": 60}]',
       "ANOMALY_PIPELINE_K8S_SECRET": "anomaly-stores", "MLFLOW_TRACKING_URI": "http://mlflow.ml:5000"}


def _retrain(monkeypatch, env: dict[str, str]):
    from airflow.dag_processing.dagbag import DagBag

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bag = DagBag(str(DAGS))
    return bag, bag.dags.get("retrain_anomaly_detector")


def test_by_default_train_runs_in_the_task_process_on_any_worker(monkeypatch):
    monkeypatch.delenv("ANOMALY_PIPELINE_TRAIN_ON", raising=False)
    _, dag = _retrain(monkeypatch, {})
    train = dag.get_task("train")
    assert type(train).__name__ == "_PythonDecoratedOperator" and train.queue == dag.get_task("ingest").queue


def test_the_queue_setting_sends_train_alone_to_the_gpu_workers(monkeypatch):
    _, dag = _retrain(monkeypatch, {"ANOMALY_PIPELINE_TRAIN_ON": "queue"})
    assert dag.get_task("train").queue == "gpu"
    assert {t.queue for t in dag.tasks if t.task_id != "train"} == {"default"}
    _, dag = _retrain(monkeypatch, {"ANOMALY_PIPELINE_TRAIN_QUEUE": "a100"})
    assert dag.get_task("train").queue == "a100"


def test_the_kubernetes_setting_renders_a_gpu_pod_running_the_same_stage_command(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.utils.helpers import prune_dict

    from pipeline.deploy import PASSED_TO_POD

    for name in PASSED_TO_POD:  # only what K8S sets below reaches the pod, whatever this shell holds
        monkeypatch.delenv(name, raising=False)

    bag, dag = _retrain(monkeypatch, K8S)
    assert bag.import_errors == {}
    train = dag.get_task("train")
    assert isinstance(train, KubernetesPodOperator)
    # the rest of the graph, and train's place in it, are unchanged
    assert [t.task_id for t in dag.tasks][:4] == ["ingest", "validate", "preprocess", "train"]
    assert train.upstream_task_ids == {"preprocess"} and train.retries == 2 and train.pool == "gpu"
    assert type(dag.get_task("preprocess")).__name__ == "_PythonDecoratedOperator"

    # what the operator's dry_run() prints, as data: its log lines share stdout
    pod = prune_dict(train.build_pod_request_obj(dry_run=True).to_dict(), mode="strict")
    assert pod["metadata"]["namespace"] == "ml-train"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example.com/anomaly:1.4"
    # the command an in-process train task runs (orchestrate.stage), in the same project path
    assert container["command"] == ["/usr/bin/tini", "--", "python", "-m", "pipeline"]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in (PROJECT / "docker" / "Dockerfile").read_text()
    assert container["args"] == ["--params", f"{PROJECT}/params.yaml", "run-stage", "{{ run_id }}", "train"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert pod["spec"]["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu",
                                           "effect": "NoSchedule", "toleration_seconds": 60}]
    volume, shm = pod["spec"]["volumes"]
    assert volume["persistent_volume_claim"]["claim_name"] == "anomaly-project"
    assert shm["empty_dir"] == {"medium": "Memory"}
    assert container["volume_mounts"] == [{"name": volume["name"], "mount_path": str(PROJECT)},
                                          {"name": shm["name"], "mount_path": "/dev/shm"}]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env == {"ANOMALY_PIPELINE_PROJECT": str(PROJECT), "MLFLOW_TRACKING_URI": "http://mlflow.ml:5000"}
    assert container["env_from"] == [{"secret_ref": {"name": "anomaly-stores"}}]

    # the command is a real one: `run-stage` exists with these arguments
    from pipeline.cli import _parser

    args = _parser().parse_args(container["args"][:3] + ["scheduled__2026-11-30", "train"])
    assert (args.command, args.run_id, args.stage) == ("run-stage", "scheduled__2026-11-30", "train")


def test_claim_and_secret_names_may_hold_dots_a_namespace_may_not():
    dotted = {**K8S, "ANOMALY_PIPELINE_K8S_PROJECT_CLAIM": "anomaly.project", "ANOMALY_PIPELINE_K8S_SECRET": "s3.keys"}
    assert train_placement(dotted).kubernetes.project_claim == "anomaly.project"
    with pytest.raises(DeploymentError, match="ANOMALY_PIPELINE_K8S_NAMESPACE"):
        train_placement({**K8S, "ANOMALY_PIPELINE_K8S_NAMESPACE": "ml.train"})


def test_a_cpu_pod_asks_for_no_gpu_and_the_default_tolerates_the_gpu_taint():
    env = {k: v for k, v in K8S.items() if k not in ("ANOMALY_PIPELINE_K8S_TOLERATIONS",)}
    assert train_placement(env).kubernetes.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                            "effect": "NoSchedule"}]
    assert train_placement({**env, "ANOMALY_PIPELINE_K8S_GPUS": "0"}).kubernetes.gpus == 0


def test_the_pod_asks_for_a_gpu_per_training_process_unless_told_and_never_fewer():
    """train.devices > 1 starts that many processes under torchrun, one per GPU."""
    env = {k: v for k, v in K8S.items() if k != "ANOMALY_PIPELINE_K8S_GPUS"}
    assert train_placement(env).kubernetes.gpus == 1
    assert train_placement(env, devices=4).kubernetes.gpus == 4
    assert train_placement({**env, "ANOMALY_PIPELINE_K8S_GPUS": "8"}, devices=4).kubernetes.gpus == 8
    assert train_placement({**env, "ANOMALY_PIPELINE_K8S_GPUS": "0"}, devices=4).kubernetes.gpus == 0  # gloo
    with pytest.raises(DeploymentError, match="ANOMALY_PIPELINE_K8S_GPUS is 2 but params.yaml's train.devices is 4"):
        train_placement({**env, "ANOMALY_PIPELINE_K8S_GPUS": "2"}, devices=4)


@pytest.mark.parametrize("change, named", [
    ({"ANOMALY_PIPELINE_TRAIN_ON": "gpu"}, "ANOMALY_PIPELINE_TRAIN_ON"),
    ({"ANOMALY_PIPELINE_TRAIN_ON": "queue", "ANOMALY_PIPELINE_TRAIN_QUEUE": "gpu queue"},
     "ANOMALY_PIPELINE_TRAIN_QUEUE"),
    ({"ANOMALY_PIPELINE_IMAGE": ""}, "ANOMALY_PIPELINE_IMAGE"),
    ({"ANOMALY_PIPELINE_K8S_PROJECT_CLAIM": ""}, "ANOMALY_PIPELINE_K8S_PROJECT_CLAIM"),
    ({"ANOMALY_PIPELINE_K8S_NAMESPACE": "ML_Train"}, "ANOMALY_PIPELINE_K8S_NAMESPACE"),
    ({"ANOMALY_PIPELINE_K8S_GPUS": "two"}, "ANOMALY_PIPELINE_K8S_GPUS"),
    ({"ANOMALY_PIPELINE_K8S_GPUS": "-1"}, "ANOMALY_PIPELINE_K8S_GPUS"),
    ({"ANOMALY_PIPELINE_K8S_NODE_SELECTOR": "gpu=true"}, "ANOMALY_PIPELINE_K8S_NODE_SELECTOR"),
    ({"ANOMALY_PIPELINE_K8S_NODE_SELECTOR": '{"gpu": true}'}, "ANOMALY_PIPELINE_K8S_NODE_SELECTOR"),
    ({"ANOMALY_PIPELINE_K8S_TOLERATIONS": '{"key": "gpu"}'}, "ANOMALY_PIPELINE_K8S_TOLERATIONS"),
    ({"ANOMALY_PIPELINE_K8S_TOLERATIONS": '[{"kee": "gpu"}]'}, "ANOMALY_PIPELINE_K8S_TOLERATIONS"),
])
def test_a_bad_setting_is_refused_with_its_name(change, named):
    with pytest.raises(DeploymentError, match=named):
        train_placement({**K8S, **change})


def test_a_bad_setting_stops_the_dag_from_loading_with_its_name(monkeypatch):
    """Airflow shows a DAG's import error on its page: better than a train task placed somewhere unmeant."""
    bag, dag = _retrain(monkeypatch, {**K8S, "ANOMALY_PIPELINE_K8S_GPUS": "lots"})
    assert dag is None
    assert "ANOMALY_PIPELINE_K8S_GPUS" in json.dumps(bag.import_errors)
