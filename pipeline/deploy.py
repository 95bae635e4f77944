"""Where the train task runs: deployment settings from the environment, not params.yaml.

params.yaml says *what* to train and is versioned with the data; where the work runs is
the platform's business and differs between the laptop, the compose stack and a cluster
running the same commit. So the same DAG file reads these variables (docker/.env.example
lists them) and places the train task accordingly:

========================================  ==================================================
ANOMALY_PIPELINE_TRAIN_ON                 ``worker`` (default): in the task's own process,
                                          on whichever worker runs it. ``queue``: the same,
                                          on a Celery worker that serves
                                          ANOMALY_PIPELINE_TRAIN_QUEUE (default ``gpu``).
                                          ``kubernetes``: a pod of ANOMALY_PIPELINE_IMAGE
                                          that runs the same stage command.
ANOMALY_PIPELINE_IMAGE                    the project image (kubernetes; required)
ANOMALY_PIPELINE_K8S_PROJECT_CLAIM        the PersistentVolumeClaim that holds the project
                                          checkout, mounted at ANOMALY_PIPELINE_PROJECT's path
                                          in the pod as on the workers (required: the run's
                                          workspace, DVC cache and checkpoints live there)
ANOMALY_PIPELINE_K8S_NAMESPACE            default ``default``
ANOMALY_PIPELINE_K8S_GPUS                 ``nvidia.com/gpu`` limit, default params.yaml's
                                          ``train.devices`` (one GPU per training process);
                                          0: a CPU pod. Fewer than train.devices is refused
ANOMALY_PIPELINE_K8S_NODE_SELECTOR        JSON object, e.g. {"nvidia.com/gpu.present": "true"}
ANOMALY_PIPELINE_K8S_TOLERATIONS          JSON list of tolerations; default tolerates the
                                          ``nvidia.com/gpu`` taint
ANOMALY_PIPELINE_K8S_SECRET               a Secret whose keys become the pod's environment
                                          (S3 and MLflow credentials); optional
========================================  ==================================================

A bad value is refused with the variable's name: the DAG then fails to load, and Airflow
shows the error on the DAG's page, instead of a task that runs somewhere else than meant.
Standard library only: the DAG processor reads this on every parse.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

PREFIX = "ANOMALY_PIPELINE_"
PLACES = ("worker", "queue", "kubernetes")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# a toleration's fields as Kubernetes spells them -> as its Python client names them
TOLERATION_FIELDS = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
                     "tolerationSeconds": "toleration_seconds"}
# Kubernetes names: a namespace is an RFC 1123 label (63 characters, no dots); a claim or a
# Secret is a DNS subdomain (253 characters, dots allowed)
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# settings a pod needs to reach the same stores as the workers; secrets go through K8S_SECRET
PASSED_TO_POD = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                 "ANOMALY_PIPELINE_RUNS")


class DeploymentError(ValueError):
    """A deployment setting that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Kubernetes:
    image: str
    project_claim: str
    namespace: str = "default"
    gpus: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=lambda: [dict(GPU_TOLERATION)])  # client's names
    secret: str | None = None


@dataclass(frozen=True)
class TrainPlacement:
    on: str = "worker"
    queue: str | None = None
    kubernetes: Kubernetes | None = None


def _json(env: Mapping[str, str], name: str, kind: type, default):
    raw = env.get(PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise DeploymentError(f"{PREFIX}{name} is not valid JSON ({error.msg} at column {error.colno}): {raw!r}")
    if not isinstance(value, kind):
        raise DeploymentError(f"{PREFIX}{name} must be a JSON {'object' if kind is dict else 'list'}, not {raw!r}")
    return value


def _name(env: Mapping[str, str], name: str, default: str | None = None, required: bool = False,
          dots: bool = True) -> str | None:
    value = env.get(PREFIX + name, "").strip() or default
    if value is None:
        if required:
            raise DeploymentError(f"{PREFIX}{name} must be set when {PREFIX}TRAIN_ON is kubernetes")
        return None
    if not (_SUBDOMAIN if dots else _LABEL).match(value):
        allowed = "lower-case letters, digits, '-' and '.'" if dots else "lower-case letters, digits and '-'"
        raise DeploymentError(f"{PREFIX}{name} must be a Kubernetes name ({allowed}), not {value!r}")
    return value


def _kubernetes(env: Mapping[str, str], devices: int) -> Kubernetes:
    image = env.get(PREFIX + "IMAGE", "").strip()
    if not image or any(c.isspace() for c in image):
        raise DeploymentError(f"{PREFIX}IMAGE must name the project image (for example "
                              f"registry.example.com/anomaly-pipeline:1.4) when {PREFIX}TRAIN_ON is kubernetes"
                              + (f", not {image!r}" if image else ""))
    gpus_raw = env.get(PREFIX + "K8S_GPUS", "").strip() or str(devices)
    if not gpus_raw.isdigit():
        raise DeploymentError(f"{PREFIX}K8S_GPUS must be a whole number of GPUs (0 for a CPU pod), not {gpus_raw!r}")
    if 0 < int(gpus_raw) < devices:  # the stage would refuse at once, after the pod was scheduled and pulled
        raise DeploymentError(f"{PREFIX}K8S_GPUS is {gpus_raw} but params.yaml's train.devices is {devices}: "
                              f"the pod would start {devices} training processes on {gpus_raw} GPU(s). Set it to "
                              f"at least {devices}, 0 for a CPU pod, or leave it unset (train.devices)")
    selector = _json(env, "K8S_NODE_SELECTOR", dict, {})
    bad = {k: v for k, v in selector.items() if not isinstance(v, str)}
    if bad:
        raise DeploymentError(f"{PREFIX}K8S_NODE_SELECTOR values must be strings; {bad} are not")
    tolerations = _json(env, "K8S_TOLERATIONS", list, [dict(GPU_TOLERATION)])
    if not all(isinstance(t, dict) and set(t) <= set(TOLERATION_FIELDS) for t in tolerations):
        raise DeploymentError(f"{PREFIX}K8S_TOLERATIONS must be a JSON list of tolerations such as "
                              f"{json.dumps(GPU_TOLERATION)}, with the fields {', '.join(TOLERATION_FIELDS)}")
    tolerations = [{TOLERATION_FIELDS[k]: v for k, v in t.items()} for t in tolerations]
    return Kubernetes(image=image, project_claim=_name(env, "K8S_PROJECT_CLAIM", required=True),
                      namespace=_name(env, "K8S_NAMESPACE", "default", dots=False), gpus=int(gpus_raw),
                      node_selector=selector, tolerations=tolerations, secret=_name(env, "K8S_SECRET"))


def train_placement(env: Mapping[str, str] | None = None, devices: int = 1) -> TrainPlacement:
    """``devices``: params.yaml's train.devices, the number of training processes (and GPUs)."""
    env = os.environ if env is None else env
    on = env.get(PREFIX + "TRAIN_ON", "").strip().lower() or "worker"
    if on not in PLACES:
        raise DeploymentError(f"{PREFIX}TRAIN_ON must be one of {', '.join(PLACES)}, not {on!r}")
    if on == "queue":
        queue = env.get(PREFIX + "TRAIN_QUEUE", "").strip() or "gpu"
        if not re.match(r"^[A-Za-z0-9_.:-]+$", queue):
            raise DeploymentError(f"{PREFIX}TRAIN_QUEUE must be a Celery queue name, not {queue!r}")
        return TrainPlacement(on=on, queue=queue)
    if on == "kubernetes":
        return TrainPlacement(on=on, kubernetes=_kubernetes(env, devices))
    return TrainPlacement()
