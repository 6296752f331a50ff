"""A model's KEDA ScaledObject, from its catalogue entry's `scaling` section.

What the catalogue does not say is fixed here, the same for every model, and why:
- the rabbitmq trigger reads the management API (`protocol: http`): unacked jobs count,
  so a busy worker is never seen as idle; it sums every queue of the model, each tenant
  lane (and on the quorum topology each priority), matched by one anchored regex;
- a second rabbitmq trigger, `high-backlog`, counts the high-priority queues alone with a
  target HIGH_PRIORITY_WEIGHT times lower: KEDA scales on the larger of the two
  recommendations, so a high backlog scales the model out that much sooner (the classic
  topology keeps high jobs in queues of their own for this, `wire.topology`);
- a third, `chunk-backlog`, counts the chunk queues, where full chunks of batches wait
  (`wire.job_chunk`): a message there is CHUNK_JOBS jobs, so its target is CHUNK_JOBS
  times lower (KEDA takes the larger recommendation again: a backlog split between single
  jobs and chunks is counted by its larger part);
- an `external-push` trigger (cluster/base/push-scaler.yaml) wakes the model the moment a job
  is accepted; polling every `polling_interval_s` is the safety net;
- scale up at once, doubling (or +2 pods) per 15 s on a spike; scale down one pod at a
  time, after a window of half the cooldown, so a burst's tail does not thrash;
- `fallback` when the management API cannot be read 3 times in a row:
  `currentReplicasIfHigher` keeps whatever runs (never cuts capacity mid-backlog) and
  holds at least one replica (or `min_replicas`).
"""

from __future__ import annotations

from typing import Any

import yaml

from autoscaler.scaling_policy import CHUNK_BACKLOG_TRIGGER, HIGH_BACKLOG_TRIGGER
from model_catalogue.catalogue import ModelEntry
from wire.job_chunk import CHUNK_JOBS
from wire.topology import Topology

NAMESPACE = "inferq"
# The broker's virtual host for the platform, where each component has its own user
# (cluster/base/broker-access.yaml).
BROKER_VHOST = "inferq"
PUSH_SCALER_ADDRESS = "push-scaler.inferq.svc:9095"
MANAGEMENT_AUTH = "rabbitmq-management"
FALLBACK_FAILURE_THRESHOLD = 3
MIN_SCALE_DOWN_WINDOW_S = 60
MIN_SCALE_DOWN_PERIOD_S = 15
# A waiting high-priority job counts as this many toward a replica's backlog.
HIGH_PRIORITY_WEIGHT = 10
# The first trigger's name (KEDA's `name`); the second's is the local autoscaler's to read.
BACKLOG_TRIGGER = "backlog"


def worker_name(model: str) -> str:
    """The scale target's name: the model's worker Deployment."""
    return f"worker-{model}"


def _duration(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds % 60 == 0 and seconds else f"{seconds} s"


def high_backlog_per_replica(entry: ModelEntry) -> int:
    """The high-backlog trigger's jobs per replica: HIGH_PRIORITY_WEIGHT times fewer."""
    return max(1, entry.scaling.backlog_per_replica // HIGH_PRIORITY_WEIGHT)


def behaviour(entry: ModelEntry) -> str:
    """One line an operator reads first, with the manifest's own figures."""
    scaling = entry.scaling
    return (
        f"{entry.name} workers sit at {scaling.min_replicas} replicas; the first accepted job wakes one "
        f"at once (push scaler; polling within ~{scaling.polling_interval_s} s is the safety net), "
        f"one replica per {scaling.backlog_per_replica} jobs of backlog (per "
        f"{high_backlog_per_replica(entry)} high-priority ones) "
        f"up to {scaling.max_replicas}, "
        f"back to {scaling.min_replicas} after {_duration(scaling.cooldown_s)} idle."
    )


def scaled_object(entry: ModelEntry) -> dict[str, Any]:
    """The ScaledObject for `entry`, scaling on the model's job queue as a cluster names it
    (no QUEUE_PREFIX; the local autoscaler reads the prefixed queue through its topology)."""
    scaling = entry.scaling
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": worker_name(entry.name),
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/part-of": "inferq", "inferq.dev/model": entry.name},
        },
        "spec": {
            "scaleTargetRef": {"name": worker_name(entry.name)},
            "pollingInterval": scaling.polling_interval_s,
            "cooldownPeriod": scaling.cooldown_s,
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "fallback": {
                "failureThreshold": FALLBACK_FAILURE_THRESHOLD,
                "replicas": max(1, scaling.min_replicas),
                "behavior": "currentReplicasIfHigher",
            },
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _hpa_behavior(scaling.cooldown_s)}},
            "triggers": [
                _queue_trigger(
                    BACKLOG_TRIGGER, Topology().job_queues(entry.name), scaling.backlog_per_replica
                ),
                _queue_trigger(
                    HIGH_BACKLOG_TRIGGER,
                    Topology().high_queues(entry.name),
                    high_backlog_per_replica(entry),
                ),
                _queue_trigger(
                    CHUNK_BACKLOG_TRIGGER,
                    Topology().chunk_queues(entry.name),
                    scaling.backlog_per_replica / CHUNK_JOBS,
                ),
                {
                    "type": "external-push",
                    "metadata": {"scalerAddress": PUSH_SCALER_ADDRESS, "model": entry.name},
                },
            ],
        },
    }


def _queue_trigger(name: str, queues: tuple[str, ...], per_replica: float) -> dict[str, Any]:
    """A rabbitmq trigger summing `queues` (matched by one anchored regex) through the
    management API, one replica per `per_replica` messages, active from the first."""
    return {
        "type": "rabbitmq",
        "name": name,
        "metadata": {
            "protocol": "http",
            "mode": "QueueLength",
            "queueName": queues_pattern(queues),
            "useRegex": "true",
            "operation": "sum",
            "vhostName": BROKER_VHOST,
            "value": f"{per_replica:g}",
            "activationValue": "0",
        },
        "authenticationRef": {"name": MANAGEMENT_AUTH},
    }


def queues_pattern(queues: tuple[str, ...]) -> str:
    """One anchored regex matching exactly `queues` (KEDA hands it to the management API)."""
    return "^(" + "|".join(queue.replace(".", "\\.") for queue in queues) + ")$"


def quorum_trigger_patch(entry: ModelEntry) -> dict[str, Any]:
    """A kustomize patch: the model's ScaledObject counts its quorum queues, one per
    priority and lane, summed, its high-priority ones apart, and its chunk queues apart."""
    quorum = Topology(queue_type="quorum")
    patterns = (
        queues_pattern(quorum.job_queues(entry.name)),
        queues_pattern(quorum.high_queues(entry.name)),
        queues_pattern(quorum.chunk_queues(entry.name)),
    )
    return {
        "target": {"kind": "ScaledObject", "name": worker_name(entry.name)},
        "patch": yaml_json_patch(
            [
                {"op": "replace", "path": f"/spec/triggers/{index}/metadata/queueName", "value": pattern}
                for index, pattern in enumerate(patterns)
            ]
        ),
    }


def yaml_json_patch(operations: list[dict[str, str]]) -> str:
    """A JSON 6902 patch as kustomize takes it inline: a YAML list of operations."""
    return yaml.safe_dump(operations, sort_keys=False, width=200)


def _hpa_behavior(cooldown_s: int) -> dict[str, Any]:
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 15},
                {"type": "Pods", "value": 2, "periodSeconds": 15},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": max(MIN_SCALE_DOWN_WINDOW_S, cooldown_s // 2),
            "selectPolicy": "Max",
            "policies": [
                {"type": "Pods", "value": 1, "periodSeconds": max(MIN_SCALE_DOWN_PERIOD_S, cooldown_s // 4)}
            ],
        },
    }
