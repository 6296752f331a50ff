"""The autoscaling decision, table-driven: each row names the KEDA or HPA rule it checks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoscaler.scaling_decision import ScalingState, decide
from autoscaler.scaling_policy import DirectionRules, FallbackBehavior, RatePolicy, ScalingPolicy

RULES = {"activation", "below-activation", "cooldown", "hpa", "fallback", "no-metric"}
POLICY = ScalingPolicy(
    name="worker-echo",
    model="echo",
    queue_name="jobs.echo",
    target_per_replica=10,
    activation_value=2,
    polling_interval_s=5,
    cooldown_s=60,
    min_replicas=0,
    max_replicas=8,
    scale_up=DirectionRules(0, "Max", (RatePolicy("Percent", 100, 15), RatePolicy("Pods", 2, 15))),
    scale_down=DirectionRules(30, "Max", (RatePolicy("Pods", 1, 30),)),
    fallback_failure_threshold=3,
    fallback_replicas=1,
)


def at(replicas: int, **fields: object) -> ScalingState:
    return replace(ScalingState(replicas=replicas), **fields)  # type: ignore[arg-type]


# (rule checked, state, metric, now, expected replicas)
ROWS = [
    ("KEDA activation: at 0, metric <= activationValue stays 0", at(0), 2.0, 100.0, 0),
    ("KEDA activation: at 0, metric > activationValue wakes to 1", at(0), 3.0, 100.0, 1),
    ("KEDA activation: waking is to max(1, min), not ceil(metric/value)", at(0), 500.0, 100.0, 1),
    ("HPA AverageValue: ceil(metric / value)", at(2), 45.0, 100.0, 4),
    ("HPA tolerance: within 10 % of target keeps the count", at(4), 43.0, 100.0, 4),
    ("HPA clamp: never above maxReplicaCount", at(8), 1000.0, 100.0, 8),
    ("HPA clamp: active but tiny backlog keeps at least 1", at(1), 3.0, 100.0, 1),
    ("HPA rate, scale-up Max(100 %, 2 pods): from 1 at most 3", at(1), 200.0, 100.0, 3),
    ("HPA rate, scale-up Max(100 %, 2 pods): from 4 at most 8", at(4), 200.0, 100.0, 8),
    (
        "HPA rate: scale-ups inside the period count from its start (1 -> 3 already)",
        at(3, scale_events=((95.0, 1, 3),)),
        200.0,
        100.0,
        3,
    ),
    (
        "HPA rate: after the period the next step is allowed",
        at(3, scale_events=((80.0, 1, 3),)),
        200.0,
        100.0,
        6,
    ),
    (
        "HPA rate: a recent scale-up does not lower the scale-down baseline",
        at(3, last_active_s=100.0, scale_events=((90.0, 1, 3),)),
        5.0,
        100.0,
        2,
    ),
    (
        "HPA rate: a scale-down inside the period uses up the 1-pod budget",
        at(3, last_active_s=100.0, scale_events=((90.0, 4, 3),)),
        5.0,
        100.0,
        3,
    ),
    (
        "HPA scale-down window: the highest recent recommendation wins",
        at(4, last_active_s=100.0, recommendations=((80.0, 4),)),
        12.0,
        100.0,
        4,
    ),
    (
        "HPA scale-down rate: 1 pod per 30 s once the window has passed",
        at(4, last_active_s=100.0, recommendations=((60.0, 4),)),
        12.0,
        100.0,
        3,
    ),
    ("KEDA cooldown: inactive but within cooldownPeriod keeps 1", at(1, last_active_s=50.0), 0.0, 100.0, 1),
    ("KEDA cooldown: inactive for cooldownPeriod goes to 0", at(1, last_active_s=40.0), 0.0, 100.0, 0),
    (
        "KEDA http counts unacked: in-flight work is activity, no scale to 0",
        at(1, last_active_s=0.0),
        3.0,
        100.0,
        1,
    ),
    ("KEDA fallback: one failed read changes nothing", at(2), None, 100.0, 2),
    (
        "KEDA fallback: failureThreshold failed reads hold fallback.replicas",
        at(4, failed_reads=2),
        None,
        100.0,
        1,
    ),
]


@pytest.mark.parametrize(("rule", "state", "metric", "now", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_rule(rule: str, state: ScalingState, metric: float | None, now: float, expected: int) -> None:
    decision = decide(POLICY, state, metric, now)
    assert decision.replicas == expected, decision.reason
    assert decision.state.replicas == expected
    assert decision.reason and decision.rule in RULES


@pytest.mark.parametrize(
    ("behavior", "running", "expected"),
    [
        ("static", 4, 1),
        ("currentReplicasIfHigher", 4, 4),
        ("currentReplicasIfHigher", 0, 1),
        ("currentReplicasIfLower", 4, 1),
        ("currentReplicasIfLower", 0, 0),
        ("currentReplicas", 4, 4),
    ],
)
def test_keda_fallback_behavior_decides_what_a_metric_outage_holds(
    behavior: FallbackBehavior, running: int, expected: int
) -> None:
    policy = replace(POLICY, fallback_behavior=behavior)
    decision = decide(policy, at(running, failed_reads=2), None, 100.0)
    assert (decision.replicas, decision.rule) == (expected, "fallback"), decision.reason


def test_a_spike_then_idle_runs_0_to_n_and_back_to_0() -> None:
    """Phases over time: activation, doubling per period, the down window, 0 after cooldown."""
    state, trace = ScalingState(), []
    for now, metric in [(0, 100), (5, 100), (20, 100), (35, 100), (50, 0), (85, 0), (115, 0), (200, 0)]:
        decision = decide(POLICY, state, float(metric), float(now))
        state = decision.state
        trace.append(decision.replicas)
    # 0 -> 1 (activation); +2 pods from the 0 the period began with; then doubling (100 %) per 15 s
    # up to the max; the 30 s scale-down window holds 8; then 1 pod per 30 s; cooldown ends at 0.
    assert trace == [1, 2, 4, 8, 8, 7, 0, 0]


HIGH = replace(POLICY, high_target_per_replica=2, high_activation_value=0)


@pytest.mark.parametrize(
    ("rule", "policy", "state", "metric", "high_metric", "replicas"),
    [
        ("one trigger: 2 jobs, both high, stay at or below activation (2)", POLICY, at(0), 2.0, 2.0, 0),
        ("high-backlog trigger: one high job activates a model below activation", HIGH, at(0), 1.0, 1.0, 1),
        ("one trigger: 12 jobs, 8 high: ceil(12 / 10) = 2", POLICY, at(1), 12.0, 8.0, 2),
        ("high-backlog trigger: the larger wish, ceil(8 / 2) = 4", HIGH, at(2), 12.0, 8.0, 4),
        ("high-backlog trigger: no high jobs, the backlog's wish alone", HIGH, at(2), 45.0, 0.0, 4),
        ("high-backlog trigger: within tolerance of both, the count stays", HIGH, at(4), 40.0, 8.0, 4),
    ],
)
def test_a_high_backlog_activates_and_scales_sooner_than_the_same_jobs_at_normal(
    rule: str, policy: ScalingPolicy, state: ScalingState, metric: float, high_metric: float, replicas: int
) -> None:
    assert decide(policy, state, metric, 100.0, high_metric).replicas == replicas, rule


CHUNKS = replace(POLICY, chunk_target_per_replica=10 / 32, chunk_activation_value=0)


@pytest.mark.parametrize(
    ("rule", "policy", "state", "metric", "chunk_metric", "replicas"),
    [
        ("chunk-backlog trigger: one chunk activates a model with no single job", CHUNKS, at(0), 0.0, 1.0, 1),
        ("chunk-backlog trigger: a chunk of 32 jobs, ceil(1 / (10 / 32)) = 4", CHUNKS, at(2), 0.0, 1.0, 4),
        (
            "chunk-backlog trigger: the larger wish, the single jobs' ceil(30 / 10) = 3",
            CHUNKS,
            at(1),
            30.0,
            0.5,
            3,
        ),
        ("no chunk trigger: chunks are not counted", POLICY, at(1), 5.0, 2.0, 1),
    ],
)
def test_chunks_count_as_their_jobs_through_their_own_trigger(
    rule: str, policy: ScalingPolicy, state: ScalingState, metric: float, chunk_metric: float, replicas: int
) -> None:
    assert decide(policy, state, metric, 100.0, chunk_metric=chunk_metric).replicas == replicas, rule
