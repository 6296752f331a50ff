"""A model's worker Deployment, from its catalogue entry's `resources` section.

No `replicas` field: KEDA owns the count (its ScaledObject), so applying the manifests
never resets what it scaled to. A replica gets AMQP_URL and no WEBHOOK_SECRET (it never
signs), and a grace period longer than its drain (DRAIN_TIMEOUT_S, 30 s) plus Ray's
shutdown, so a batch in flight finishes on SIGTERM.
"""

from __future__ import annotations

from typing import Any

from contract.model_catalogue import ModelEntry
from manifests.scaled_objects import NAMESPACE, worker_name

IMAGE = "inferq:latest"
TERMINATION_GRACE_S = 60


def worker_deployment(entry: ModelEntry) -> dict[str, Any]:
    resources = entry.resources
    labels = {"app.kubernetes.io/part-of": "inferq", "inferq.dev/model": entry.name}
    env: list[dict[str, Any]] = [
        {"name": "AMQP_URL", "valueFrom": {"secretKeyRef": {"name": "inferq", "key": "AMQP_URL"}}}
    ]
    limits: dict[str, str] = {"memory": resources.memory}
    if resources.gpus:
        env.append({"name": "WORKER_NUM_GPUS", "value": str(resources.gpus)})
        limits["nvidia.com/gpu"] = str(resources.gpus)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": worker_name(entry.name), "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"inferq.dev/model": entry.name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "containers": [
                        {
                            "name": "worker",
                            "image": IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-m", "ray_workers.pod", "worker", entry.name],
                            "env": env,
                            "envFrom": [{"configMapRef": {"name": "inferq"}}],
                            "resources": {
                                "requests": {"cpu": _cpu(resources.cpus), "memory": resources.memory},
                                "limits": limits,
                            },
                        }
                    ],
                },
            },
        },
    }


def _cpu(cpus: float) -> str:
    """Kubernetes CPU quantity: whole cores as `2`, fractions in millicores (`500m`)."""
    return str(int(cpus)) if cpus == int(cpus) else f"{round(cpus * 1000)}m"
