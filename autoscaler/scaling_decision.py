"""The autoscaling decision as a pure function of (policy, state, metric, time).

It applies the rules KEDA and the HPA apply to a ScaledObject, in their order:

1. Fallback (KEDA): after `failureThreshold` failed metric reads in a row, hold
   `fallback.replicas`, or more as `fallback.behavior` says (`currentReplicasIfHigher`
   keeps what runs); a single failed read changes nothing.
2. Activation (KEDA): the scaler is active while metric > activationValue (or, with a
   high-backlog or chunk-backlog trigger, while its metric exceeds its own). At 0
   replicas an active scaler wakes the target to max(1, minReplicaCount); an inactive
   one leaves it at 0.
3. Cooldown (KEDA): with minReplicaCount 0, once the scaler has been inactive for
   cooldownPeriod the target goes back to 0.
4. HPA, AverageValue target: desired = ceil(metric / value), kept at the current count
   when metric / (current * value) is within the 10 % tolerance, clamped to
   [max(1, minReplicaCount), maxReplicaCount]. With a high-backlog trigger the HPA
   computes the same for the high-priority metric against its own value and takes the
   larger: a high backlog scales the model sooner. A chunk-backlog trigger's metric (chunk
   messages) is taken the same way, against its own value.
5. Stabilisation (HPA behavior): scaling up takes the lowest recommendation of the
   scale-up window, scaling down the highest of the scale-down window.
6. Rate policies (HPA behavior): a change may not exceed what the direction's policies
   allow over their periods (Pods: +/- n; Percent: +/- n % of the count at the start of
   the period); selectPolicy Max takes the policy allowing the largest change, Min the
   smallest, Disabled allows none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from autoscaler.scaling_policy import DirectionRules, ScalingPolicy

# Longer than any rate policy's period (the HPA caps periodSeconds at 1800).
EVENT_MEMORY_S = 1800.0


@dataclass(frozen=True)
class ScalingState:
    replicas: int = 0
    last_active_s: float | None = None
    failed_reads: int = 0
    # (time, recommendation) within the longest stabilisation window.
    recommendations: tuple[tuple[float, int], ...] = ()
    # (time, replicas before, replicas after) of recent changes, for rate policies.
    scale_events: tuple[tuple[float, int, int], ...] = ()


@dataclass(frozen=True)
class Decision:
    replicas: int
    state: ScalingState
    reason: str
    # Which rule decided: activation, below-activation, cooldown, hpa, fallback, no-metric.
    rule: str


def decide(
    policy: ScalingPolicy,
    state: ScalingState,
    metric: float | None,
    now_s: float,
    high_metric: float = 0.0,
    chunk_metric: float = 0.0,
) -> Decision:
    """`metric`: the model's backlog of single jobs (None: it could not be read);
    `high_metric`: its high-priority part, counted by the policy's high-backlog trigger when
    it has one; `chunk_metric`: its chunk messages, counted by its chunk-backlog trigger."""
    if metric is None:
        return _fallback(policy, state, now_s)
    state = replace(state, failed_reads=0)
    high_active = policy.high_target_per_replica is not None and high_metric > policy.high_activation_value
    chunk_active = (
        policy.chunk_target_per_replica is not None and chunk_metric > policy.chunk_activation_value
    )
    active = metric > policy.activation_value or high_active or chunk_active
    if active:
        state = replace(state, last_active_s=now_s)
    if state.replicas == 0:
        if not active:
            reason = f"metric {metric:g} <= activationValue {policy.activation_value:g}: stay at 0"
            return Decision(0, state, reason, "below-activation")
        target = max(1, policy.min_replicas)
        reason = f"activation: metric {metric:g} (high {high_metric:g}, chunks {chunk_metric:g}) > activation"
        return _changed(state, target, now_s, reason, "activation")
    idle_s = now_s - (state.last_active_s if state.last_active_s is not None else now_s)
    if not active and policy.min_replicas == 0 and idle_s >= policy.cooldown_s:
        reason = f"inactive for {idle_s:.0f} s >= cooldownPeriod {policy.cooldown_s:g} s"
        return _changed(state, 0, now_s, reason, "cooldown")
    return _hpa(policy, state, (metric, high_metric, chunk_metric), now_s)


def decide_on_demand(policy: ScalingPolicy, state: ScalingState, now_s: float) -> Decision:
    """A demand event (jobs are arriving, pushed by the ingress): wake a model at zero at once,
    as KEDA's external-push activation does. It counts as activity for the cooldown; every
    other number is still the polled metric's to decide."""
    state = replace(state, last_active_s=now_s)
    if state.replicas > 0:
        return Decision(state.replicas, state, "demand event: already running", "push-hold")
    target = max(1, policy.min_replicas)
    return _changed(state, target, now_s, "push activation: demand event", "push-activation")


def _fallback(policy: ScalingPolicy, state: ScalingState, now_s: float) -> Decision:
    state = replace(state, failed_reads=state.failed_reads + 1)
    threshold, replicas = policy.fallback_failure_threshold, _fallback_replicas(policy, state.replicas)
    if threshold is not None and replicas is not None and state.failed_reads >= threshold:
        if replicas == state.replicas:
            return Decision(replicas, state, f"fallback: holding {replicas}", "fallback")
        return _changed(
            state, replicas, now_s, f"fallback after {state.failed_reads} failed reads", "fallback"
        )
    reason = f"metric unavailable ({state.failed_reads} in a row): no change"
    return Decision(state.replicas, state, reason, "no-metric")


def _fallback_replicas(policy: ScalingPolicy, current: int) -> int | None:
    """KEDA's `fallback.behavior`: `currentReplicasIfHigher` never cuts what runs."""
    replicas = policy.fallback_replicas
    if replicas is None or policy.fallback_behavior == "static":
        return replicas
    if policy.fallback_behavior == "currentReplicas":
        return current
    if policy.fallback_behavior == "currentReplicasIfHigher":
        return max(current, replicas)
    return min(current, replicas)


def _wish(policy: ScalingPolicy, current: int, metric: float, target_per_replica: float) -> int:
    """One metric's replicas, as the HPA computes them: unchanged within the tolerance."""
    ratio = metric / (current * target_per_replica)
    return current if abs(ratio - 1.0) <= policy.tolerance else math.ceil(metric / target_per_replica)


def _hpa(
    policy: ScalingPolicy, state: ScalingState, metrics: tuple[float, float, float], now_s: float
) -> Decision:
    metric, high_metric, chunk_metric = metrics
    current = state.replicas
    raw = _wish(policy, current, metric, policy.target_per_replica)
    # The HPA takes the larger of its metrics' wishes.
    if policy.high_target_per_replica is not None:
        raw = max(raw, _wish(policy, current, high_metric, policy.high_target_per_replica))
    if policy.chunk_target_per_replica is not None:
        raw = max(raw, _wish(policy, current, chunk_metric, policy.chunk_target_per_replica))
    raw = min(max(raw, max(1, policy.min_replicas)), policy.max_replicas)
    keep_s = max(policy.scale_up.stabilization_window_s, policy.scale_down.stabilization_window_s)
    kept = tuple((t, r) for t, r in state.recommendations if now_s - t <= keep_s)
    recommendations = (*kept, (now_s, raw))
    state = replace(state, recommendations=recommendations)
    if raw > current:
        window = [r for t, r in recommendations if now_s - t <= policy.scale_up.stabilization_window_s]
        stabilised = max(current, min(window))
        target = min(stabilised, _limit(policy.scale_up, state, now_s, up=True))
    elif raw < current:
        window = [r for t, r in recommendations if now_s - t <= policy.scale_down.stabilization_window_s]
        stabilised = min(current, max(window))
        target = max(stabilised, _limit(policy.scale_down, state, now_s, up=False))
    else:
        target = current
    if target == current:
        return Decision(current, state, f"metric {metric:g}: {current} replica(s) stay (wanted {raw})", "hpa")
    reason = (
        f"metric {metric:g} / value {policy.target_per_replica:g} "
        f"(high {high_metric:g}, chunks {chunk_metric:g}) -> {raw}"
    )
    return _changed(state, target, now_s, reason, "hpa")


def _limit(rules: DirectionRules, state: ScalingState, now_s: float, up: bool) -> int:
    """The furthest the count may move now under the direction's rate policies.

    As the HPA computes it: the count at the start of a policy's period is the current
    count less what was added within the period (scaling up), or plus what was removed
    (scaling down).
    """
    current = state.replicas
    if rules.select == "Disabled":
        return current
    limits = []
    for policy in rules.policies:
        recent = [(before, after) for t, before, after in state.scale_events if now_s - t < policy.period_s]
        if up:
            start = current - sum(after - before for before, after in recent if after > before)
            grow = policy.value if policy.kind == "Pods" else math.ceil(start * policy.value / 100)
            limits.append(start + grow)
        else:
            start = current + sum(before - after for before, after in recent if after < before)
            shrink = policy.value if policy.kind == "Pods" else math.floor(start * policy.value / 100)
            limits.append(start - shrink)
    if up:
        return max(limits) if rules.select == "Max" else min(limits)
    return min(limits) if rules.select == "Max" else max(limits)


def _changed(state: ScalingState, replicas: int, now_s: float, reason: str, rule: str) -> Decision:
    events = tuple(e for e in state.scale_events if now_s - e[0] <= EVENT_MEMORY_S)
    new_state = replace(state, replicas=replicas, scale_events=(*events, (now_s, state.replicas, replicas)))
    return Decision(replicas, new_state, reason, rule)
