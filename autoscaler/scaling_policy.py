"""A KEDA ScaledObject, read into the rules the local autoscaler applies.

The same files in `keda/` drive KEDA in a cluster and the local autoscaler on one
machine. Reading goes parse -> validate cross-field rules -> construct, and every error
names the file, the field and the bad value. Defaults are KEDA's and the HPA's own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

RateKind = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
# KEDA's fallback behaviours this autoscaler applies (not `scalingModifiers`).
FallbackBehavior = Literal["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]
FALLBACK_BEHAVIORS = ("static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower")

KEDA_DEFAULT_POLLING_INTERVAL_S = 30.0
KEDA_DEFAULT_COOLDOWN_S = 300.0
KEDA_DEFAULT_MAX_REPLICAS = 100
HPA_TOLERANCE = 0.1
# The label naming a ScaledObject's model (manifests.scaled_objects writes it).
MODEL_LABEL = "inferq.dev/model"
# The name of the optional second rabbitmq trigger: the model's high-priority queues alone.
HIGH_BACKLOG_TRIGGER = "high-backlog"
# The name of the optional third: the model's chunk queues (`wire.job_chunk`), whose
# messages are CHUNK_JOBS jobs each, with a target to match.
CHUNK_BACKLOG_TRIGGER = "chunk-backlog"
_APART = (HIGH_BACKLOG_TRIGGER, CHUNK_BACKLOG_TRIGGER)


class InvalidScaledObject(ValueError):
    """A ScaledObject the autoscaler cannot apply; the message names the field and value."""


@dataclass(frozen=True)
class RatePolicy:
    kind: RateKind
    value: int
    period_s: float


@dataclass(frozen=True)
class DirectionRules:
    """The HPA `behavior` for one direction (scaleUp or scaleDown)."""

    stabilization_window_s: float
    select: SelectPolicy
    policies: tuple[RatePolicy, ...]


# The HPA's defaults (autoscaling/v2): up at once, by 100 % or 4 pods per 15 s, the larger;
# down after a 300 s window, by up to 100 % per 15 s.
HPA_DEFAULT_SCALE_UP = DirectionRules(
    0.0, "Max", (RatePolicy("Percent", 100, 15.0), RatePolicy("Pods", 4, 15.0))
)
HPA_DEFAULT_SCALE_DOWN = DirectionRules(300.0, "Max", (RatePolicy("Percent", 100, 15.0),))


@dataclass(frozen=True)
class ScalingPolicy:
    name: str
    model: str
    queue_name: str
    target_per_replica: float
    activation_value: float
    polling_interval_s: float
    cooldown_s: float
    min_replicas: int
    max_replicas: int
    scale_up: DirectionRules = HPA_DEFAULT_SCALE_UP
    scale_down: DirectionRules = HPA_DEFAULT_SCALE_DOWN
    fallback_failure_threshold: int | None = None
    fallback_replicas: int | None = None
    fallback_behavior: FallbackBehavior = "static"
    tolerance: float = HPA_TOLERANCE
    # The `high-backlog` trigger, when there is one: high-priority jobs per replica, and
    # its activation (KEDA: active when either trigger is; replicas: the larger wish).
    high_target_per_replica: float | None = None
    high_activation_value: float = 0.0
    # The `chunk-backlog` trigger, when there is one: chunk messages per replica, and its
    # activation (the same rules as the high-backlog trigger's).
    chunk_target_per_replica: float | None = None
    chunk_activation_value: float = 0.0


def _number(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidScaledObject(f"{where}={value!r} is not a number") from exc


def _rules(raw: Mapping[str, Any] | None, default: DirectionRules, where: str) -> DirectionRules:
    if not raw:
        return default
    policies = (
        tuple(
            RatePolicy(
                p["type"], int(p["value"]), _number(p["periodSeconds"], f"{where}.policies.periodSeconds")
            )
            for p in raw.get("policies", [])
        )
        or default.policies
    )
    for policy in policies:
        if policy.kind not in ("Pods", "Percent") or policy.value <= 0 or policy.period_s <= 0:
            raise InvalidScaledObject(f"{where}.policies has an invalid entry {policy}")
    select = raw.get("selectPolicy", "Max")
    if select not in ("Max", "Min", "Disabled"):
        raise InvalidScaledObject(f"{where}.selectPolicy={select!r}; expected Max, Min or Disabled")
    window = raw.get("stabilizationWindowSeconds", default.stabilization_window_s)
    return DirectionRules(_number(window, f"{where}.stabilizationWindowSeconds"), select, policies)


def policy_from_scaled_object(doc: Mapping[str, Any], source: str = "ScaledObject") -> ScalingPolicy:
    """Parse, validate, construct. One rabbitmq QueueLength trigger over http is required
    (on `jobs.<model>`, or a regex over its queues with `useRegex` and `operation: sum`);
    a second one named `high-backlog` may count the high-priority queues alone; an
    `external-push` trigger for the same model may sit beside them (KEDA's push scaler,
    which the local stack's own push activation stands in for: it is not polled here)."""
    if doc.get("kind") != "ScaledObject":
        raise InvalidScaledObject(f"{source}: kind={doc.get('kind')!r}; expected ScaledObject")
    spec = doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name", "?")
    triggers = spec.get("triggers") or []
    rabbitmq = [t for t in triggers if t.get("type") == "rabbitmq" and t.get("name") not in _APART]
    high = [t for t in triggers if t.get("type") == "rabbitmq" and t.get("name") == HIGH_BACKLOG_TRIGGER]
    chunk = [t for t in triggers if t.get("type") == "rabbitmq" and t.get("name") == CHUNK_BACKLOG_TRIGGER]
    others = [t.get("type") for t in triggers if t.get("type") not in ("rabbitmq", "external-push")]
    if len(rabbitmq) != 1 or len(high) > 1 or len(chunk) > 1 or others:
        raise InvalidScaledObject(
            f"{source}: expected one rabbitmq trigger (and optionally one named {HIGH_BACKLOG_TRIGGER}, one "
            f"named {CHUNK_BACKLOG_TRIGGER} and external-push), got {triggers!r}"
        )
    meta = _queue_length_metadata(rabbitmq[0], source)
    queue_name = str(meta.get("queueName", ""))
    model = _model_of_queues(doc, queue_name, meta, source)
    high_meta = _apart_metadata(high[0], f"jobs.{model}.high", f"jobs.{model}", source) if high else None
    chunk_meta = _apart_metadata(chunk[0], f"jobs.{model}.chunks", f"jobs.{model}", source) if chunk else None
    for push in (t for t in triggers if t.get("type") == "external-push"):
        pushed = (push.get("metadata") or {}).get("model")
        if pushed != model:
            raise InvalidScaledObject(
                f"{source}: external-push trigger model={pushed!r}; expected the queue's model {model!r}"
            )
    behavior = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior") or {}
    fallback = spec.get("fallback") or {}
    policy = ScalingPolicy(
        name=name,
        model=model,
        queue_name=queue_name,
        target_per_replica=_number(meta.get("value"), f"{source}: value"),
        activation_value=_number(meta.get("activationValue", 0), f"{source}: activationValue"),
        polling_interval_s=_number(
            spec.get("pollingInterval", KEDA_DEFAULT_POLLING_INTERVAL_S), f"{source}: pollingInterval"
        ),
        cooldown_s=_number(spec.get("cooldownPeriod", KEDA_DEFAULT_COOLDOWN_S), f"{source}: cooldownPeriod"),
        min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", KEDA_DEFAULT_MAX_REPLICAS)),
        scale_up=_rules(behavior.get("scaleUp"), HPA_DEFAULT_SCALE_UP, "scaleUp"),
        scale_down=_rules(behavior.get("scaleDown"), HPA_DEFAULT_SCALE_DOWN, "scaleDown"),
        fallback_failure_threshold=fallback.get("failureThreshold"),
        fallback_replicas=fallback.get("replicas"),
        fallback_behavior=fallback.get("behavior", "static"),
        high_target_per_replica=_apart_target(high_meta, f"{source}: high-backlog"),
        high_activation_value=_apart_activation(high_meta, f"{source}: high-backlog"),
        chunk_target_per_replica=_apart_target(chunk_meta, f"{source}: chunk-backlog"),
        chunk_activation_value=_apart_activation(chunk_meta, f"{source}: chunk-backlog"),
    )
    _validate(policy, source)
    return policy


def _queue_length_metadata(trigger: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """A rabbitmq trigger's metadata, once it is QueueLength over http."""
    meta: Mapping[str, Any] = trigger.get("metadata") or {}
    if meta.get("protocol") != "http":
        raise InvalidScaledObject(
            f"{source}: trigger protocol={meta.get('protocol')!r}; expected http (unacked jobs count)"
        )
    if meta.get("mode") != "QueueLength":
        raise InvalidScaledObject(f"{source}: trigger mode={meta.get('mode')!r}; expected QueueLength")
    return meta


def _apart_metadata(
    trigger: Mapping[str, Any], counted: str, not_counted: str, source: str
) -> Mapping[str, Any]:
    """A trigger counting some of the model's queues apart (high-backlog: its high queues;
    chunk-backlog: its chunk queues): a summed regex matching `counted` and not the model's
    main queue. Which queues are summed here is the topology's (`high_queues`, `chunk_queues`)."""
    name = trigger.get("name")
    meta = _queue_length_metadata(trigger, source)
    pattern = str(meta.get("queueName", ""))
    if str(meta.get("useRegex", "false")).lower() != "true" or meta.get("operation", "sum") != "sum":
        raise InvalidScaledObject(f"{source}: the {name} trigger needs useRegex and operation sum")
    try:
        counts = [re.fullmatch(pattern, queue) is not None for queue in (counted, not_counted)]
    except re.error as exc:
        raise InvalidScaledObject(f"{source}: queueName={pattern!r} is not a regex: {exc}") from exc
    if counts != [True, False]:
        raise InvalidScaledObject(
            f"{source}: the {name} queueName={pattern!r} must match {counted} and not {not_counted}"
        )
    return meta


def _apart_target(meta: Mapping[str, Any] | None, where: str) -> float | None:
    """An apart trigger's jobs per replica; None without the trigger."""
    return None if meta is None else _number(meta.get("value"), f"{where} value")


def _apart_activation(meta: Mapping[str, Any] | None, where: str) -> float:
    """An apart trigger's activation (KEDA's default 0)."""
    return 0.0 if meta is None else _number(meta.get("activationValue", 0), f"{where} activationValue")


def _model_of_queues(doc: Mapping[str, Any], queue_name: str, meta: Mapping[str, Any], source: str) -> str:
    """The model whose queues the trigger counts: `jobs.<model>`, or with `useRegex` (every
    lane of the model, summed) the `inferq.dev/model` label's, which the regex must match.
    Which queues are summed here is the topology's (`job_queues`), as the regex says."""
    if str(meta.get("useRegex", "false")).lower() != "true":
        if not queue_name.startswith("jobs."):
            raise InvalidScaledObject(f"{source}: queueName={queue_name!r}; expected jobs.<model>")
        return queue_name.removeprefix("jobs.")
    if meta.get("operation", "sum") != "sum":
        raise InvalidScaledObject(
            f"{source}: operation={meta.get('operation')!r}; expected sum (a backlog is all its queues)"
        )
    model = str(((doc.get("metadata") or {}).get("labels") or {}).get(MODEL_LABEL, ""))
    if not model:
        raise InvalidScaledObject(f"{source}: useRegex needs the {MODEL_LABEL} label naming the model")
    try:
        matches = re.fullmatch(queue_name, f"jobs.{model}") is not None
    except re.error as exc:
        raise InvalidScaledObject(f"{source}: queueName={queue_name!r} is not a regex: {exc}") from exc
    if not matches:
        raise InvalidScaledObject(f"{source}: queueName={queue_name!r} does not match jobs.{model}")
    return model


def _validate(policy: ScalingPolicy, source: str) -> None:
    if policy.target_per_replica <= 0:
        raise InvalidScaledObject(f"{source}: value={policy.target_per_replica} must be > 0")
    if policy.high_target_per_replica is not None and policy.high_target_per_replica <= 0:
        raise InvalidScaledObject(
            f"{source}: high-backlog value={policy.high_target_per_replica} must be > 0"
        )
    if policy.chunk_target_per_replica is not None and policy.chunk_target_per_replica <= 0:
        raise InvalidScaledObject(
            f"{source}: chunk-backlog value={policy.chunk_target_per_replica} must be > 0"
        )
    if policy.activation_value < 0:
        raise InvalidScaledObject(f"{source}: activationValue={policy.activation_value} must be >= 0")
    if policy.polling_interval_s <= 0:
        raise InvalidScaledObject(f"{source}: pollingInterval={policy.polling_interval_s} must be > 0")
    if not 0 <= policy.min_replicas <= policy.max_replicas or policy.max_replicas < 1:
        raise InvalidScaledObject(
            f"{source}: minReplicaCount={policy.min_replicas} and maxReplicaCount={policy.max_replicas} "
            "need 0 <= min <= max and max >= 1"
        )
    if policy.fallback_behavior not in FALLBACK_BEHAVIORS:
        raise InvalidScaledObject(
            f"{source}: fallback.behavior={policy.fallback_behavior!r}; expected one of {FALLBACK_BEHAVIORS}"
        )
    if policy.fallback_replicas is not None and policy.fallback_replicas > policy.max_replicas:
        raise InvalidScaledObject(
            f"{source}: fallback.replicas={policy.fallback_replicas} exceeds maxReplicaCount"
        )


def load_policies(directory: Path) -> dict[str, ScalingPolicy]:
    """Every ScaledObject in `directory`'s YAML files, by model."""
    policies: dict[str, ScalingPolicy] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ScaledObject":
                policy = policy_from_scaled_object(doc, str(path))
                policies[policy.model] = policy
    return policies
