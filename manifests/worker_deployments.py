"""A model's worker Deployment and its PodDisruptionBudget, from its catalogue entry's
`resources` section.

No `replicas` field: KEDA owns the count (its ScaledObject), so applying the manifests
never resets what it scaled to. A replica gets the AMQP_URL of its model's own broker
user (it may consume only its model's queue) and no WEBHOOK_SECRET (it never signs), and
a grace period longer than its drain (DRAIN_TIMEOUT_S, 30 s) plus Ray's shutdown, so a
batch in flight finishes on SIGTERM. The pod runs hardened (non-root, read-only root, no
capabilities, no service-account token): Ray writes only to its `/tmp` and `/dev/shm`
volumes. A model with GPUs uses the `inferq-cuda` image, asks for them as a limit and
carries the label `inferq.dev/accelerator: gpu`, which the overlays patch by: kind maps
the image to the CPU one and drops the GPUs, GKE adds the GPU node pool's selector and toleration.
"""

from __future__ import annotations

from typing import Any

from manifests.scaled_objects import NAMESPACE, worker_name
from model_catalogue.catalogue import ModelEntry

IMAGE, CUDA_IMAGE = "inferq", "inferq-cuda"
ACCELERATOR_LABEL = "inferq.dev/accelerator"
# The broker user a pod connects as (broker_access.roles); its AMQP_URL is in the Secret
# `inferq-broker-<role>`, written by cluster-up.
BROKER_ROLE_LABEL = "inferq.dev/broker-role"
# Pods that read and write the job records: the only ones Redis admits (NetworkPolicy),
# each with REDIS_URL (Redis's password in it) from the Secret REDIS_SECRET.
RECORDS_CLIENT_LABEL = "inferq.dev/records-client"
REDIS_SECRET = "inferq-redis"
# Pods that read uploads and write outputs, with the store's settings from OBJECT_STORE_SECRET
# (optional: without it uploads are off).
STORE_CLIENT_LABEL = "inferq.dev/store-client"
OBJECT_STORE_SECRET = "inferq-object-store"
TERMINATION_GRACE_S = 60
HEALTH_PORT, METRICS_PORT = 8080, 9102
# Ray's object store lives in shared memory: the container default (64 MiB) is too small.
SHM_SIZE = "1Gi"
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _labels(entry: ModelEntry) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/part-of": "inferq",
        "app.kubernetes.io/component": "worker",
        "inferq.dev/model": entry.name,
        "inferq.dev/broker-client": "true",
        RECORDS_CLIENT_LABEL: "true",
        STORE_CLIENT_LABEL: "true",
        BROKER_ROLE_LABEL: f"worker-{entry.name}",
    }
    if entry.resources.gpus:
        labels[ACCELERATOR_LABEL] = "gpu"
    return labels


def _amqp_url_ref(entry: ModelEntry) -> dict[str, str]:
    return {"name": f"inferq-broker-worker-{entry.name}", "key": "AMQP_URL"}


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "health"},
        "periodSeconds": period_s,
        "failureThreshold": failures,
    }


def model_threads(entry: ModelEntry) -> int:
    """Each worker process's model threads: the pod's CPUs shared by its processes. The
    default (the cores) would read the node's cores, not the pod's request, and run more
    threads than the pod has CPUs."""
    resources = entry.resources
    processes = resources.processes_per_gpu if resources.gpus else 1
    return max(1, int(resources.cpus // processes))


RAY_NODE_IP_ENV = {"name": "RAY_NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def worker_deployment(entry: ModelEntry) -> dict[str, Any]:
    resources = entry.resources
    env: list[dict[str, Any]] = [
        {"name": "AMQP_URL", "valueFrom": {"secretKeyRef": _amqp_url_ref(entry)}},
        # The job records' URL carries Redis's password (the Secret cluster/provision.sh makes).
        {"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": REDIS_SECRET, "key": "REDIS_URL"}}},
        {"name": "POD_HEALTH_HOST", "value": "0.0.0.0"},
        # Ray on the pod's IP: on loopback its metrics exporter binds loopback, unscrapable.
        RAY_NODE_IP_ENV,
        {"name": "HOME", "value": "/tmp"},
        {"name": "MODEL_THREADS", "value": str(model_threads(entry))},
    ]
    limits: dict[str, str] = {"memory": resources.memory}
    if resources.gpus:
        env.append({"name": "WORKER_NUM_GPUS", "value": str(resources.gpus)})
        env.append({"name": "WORKER_PROCESSES_PER_GPU", "value": str(resources.processes_per_gpu)})
        limits["nvidia.com/gpu"] = str(resources.gpus)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": worker_name(entry.name), "namespace": NAMESPACE, "labels": _labels(entry)},
        "spec": {
            "selector": {"matchLabels": {"inferq.dev/model": entry.name}},
            "template": {
                "metadata": {"labels": _labels(entry)},
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "worker",
                            "image": CUDA_IMAGE if resources.gpus else IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-m", "ray_workers.pod", "worker", entry.name],
                            "env": env,
                            "envFrom": [
                                {"configMapRef": {"name": "inferq"}},
                                {"secretRef": {"name": OBJECT_STORE_SECRET, "optional": True}},
                            ],
                            "ports": [
                                {"name": "health", "containerPort": HEALTH_PORT},
                                {"name": "metrics", "containerPort": METRICS_PORT},
                            ],
                            # Model load can take minutes (a GPU image, large weights): the
                            # startup probe holds liveness off for up to 10 minutes.
                            "startupProbe": _probe("/livez", 10, 60),
                            "readinessProbe": _probe("/readyz", 5, 3),
                            "livenessProbe": _probe("/livez", 10, 3),
                            "resources": {
                                "requests": {"cpu": _cpu(resources.cpus), "memory": resources.memory},
                                "limits": limits,
                            },
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "shm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
                    ],
                },
            },
        },
    }


def worker_disruption_budget(entry: ModelEntry) -> dict[str, Any]:
    """A drain takes one replica of the model at a time (each drains its batch first)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": worker_name(entry.name), "namespace": NAMESPACE, "labels": _labels(entry)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"inferq.dev/model": entry.name}}},
    }


def _cpu(cpus: float) -> str:
    """Kubernetes CPU quantity: whole cores as `2`, fractions in millicores (`500m`)."""
    return str(int(cpus)) if cpus == int(cpus) else f"{round(cpus * 1000)}m"
