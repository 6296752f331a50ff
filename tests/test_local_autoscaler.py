"""The autoscaler loop around the pure decision: it applies changes, retries a failed
apply, counts failed reads, and exports its state (fake queue and fake Serve)."""

from __future__ import annotations

import asyncio
import dataclasses

from prometheus_client import CollectorRegistry

from autoscaler.loop import AutoscalerMetrics, LocalAutoscaler
from autoscaler.queue_metrics import QueueMetricUnavailable
from autoscaler.scaling_policy import ScalingPolicy
from wire.job_chunk import CHUNK_JOBS

POLICY = ScalingPolicy(
    name="worker-echo",
    model="echo",
    queue_name="jobs.echo",
    target_per_replica=10,
    activation_value=0,
    polling_interval_s=1,
    cooldown_s=30,
    min_replicas=0,
    max_replicas=4,
)


class FakeClock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(
        self,
        queues: tuple[str, ...] = ("jobs.echo",),
        chunk_queues: tuple[str, ...] = (),
        policy: ScalingPolicy = POLICY,
    ) -> None:
        self.queues = queues
        self.chunk_queues = chunk_queues
        self.read_from: list[str] = []
        self.backlog: float | None = 0.0
        self.applied: list[tuple[str, int]] = []
        self.fail_apply = False
        self.apply_takes_s = 0.0
        self.registry = CollectorRegistry()
        self.clock = FakeClock()
        self.autoscaler = LocalAutoscaler(
            {"echo": policy},
            lambda model: self.queues,
            lambda model: self.queues[:1],
            lambda model: self.chunk_queues,
            self.read,
            self.apply,
            AutoscalerMetrics(self.registry),
            self.clock,
        )

    async def read(self, queue: str) -> float:
        self.read_from.append(queue)
        if self.backlog is None:
            raise QueueMetricUnavailable("management API down")
        return self.backlog

    async def apply(self, model: str, replicas: int) -> None:
        if self.fail_apply:
            raise RuntimeError("serve.run failed")
        self.clock.now += self.apply_takes_s
        self.applied.append((model, replicas))

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"model": "echo", **labels}) or 0.0


async def test_activation_is_applied_and_exported() -> None:
    harness = Harness()
    await harness.autoscaler.tick("echo")
    harness.backlog = 25.0
    await harness.autoscaler.tick("echo")

    assert harness.applied == [("echo", 1)]
    assert harness.sample("inferq_autoscaler_replicas") == 1
    assert harness.sample("inferq_autoscaler_queue_messages") == 25
    assert harness.sample("inferq_autoscaler_scale_events_total", direction="up") == 1
    assert harness.sample("inferq_autoscaler_decisions_total", rule="activation") == 1
    assert harness.sample("inferq_autoscaler_decisions_total", rule="below-activation") == 1


async def test_a_model_with_a_queue_per_priority_scales_on_their_sum() -> None:
    """The quorum topology: KEDA's `operation: sum` over the model's three queues."""
    harness = Harness(("jobs.echo.high", "jobs.echo.normal", "jobs.echo.low"))
    harness.backlog = 10.0  # in each of them
    await harness.autoscaler.tick("echo")

    assert harness.read_from == ["jobs.echo.high", "jobs.echo.normal", "jobs.echo.low"]
    assert harness.sample("inferq_autoscaler_queue_messages") == 30
    assert harness.applied == [("echo", 1)]  # activation from zero goes to one first
    await harness.autoscaler.tick("echo")
    assert harness.applied[-1] == ("echo", 3)  # 30 waiting / 10 per replica


async def test_chunk_queues_count_as_their_jobs_and_scale_through_their_trigger() -> None:
    """A batch's full chunks wait in chunk queues, CHUNK_JOBS jobs a message."""
    chunks = dataclasses.replace(POLICY, chunk_target_per_replica=POLICY.target_per_replica / CHUNK_JOBS)
    harness = Harness(("jobs.echo",), ("jobs.echo.chunks",), chunks)
    harness.backlog = 1.0  # one job waits alone, one chunk beside it
    await harness.autoscaler.tick("echo")
    await harness.autoscaler.tick("echo")

    assert harness.read_from[:2] == ["jobs.echo", "jobs.echo.chunks"]
    assert harness.sample("inferq_autoscaler_queue_messages") == 1 + CHUNK_JOBS
    assert harness.applied == [("echo", 1), ("echo", 4)]  # ceil(1 chunk / (10 / 32 per replica))


async def test_the_time_a_scale_up_takes_to_apply_does_not_count_towards_the_cooldown() -> None:
    """Serve took 40 s (> the 30 s cooldown) to add the replica; the next poll reads 0
    (the broker's statistics lag): the model stays up, the cooldown starts now."""
    harness = Harness()
    harness.backlog, harness.apply_takes_s = 25.0, 40.0
    await harness.autoscaler.tick("echo")
    harness.backlog = 0.0
    await harness.autoscaler.tick("echo")

    assert harness.applied == [("echo", 1)]
    harness.clock.now += 31
    await harness.autoscaler.tick("echo")
    assert harness.applied == [("echo", 1), ("echo", 0)]  # once idle for the cooldown, observed


async def test_a_failed_apply_keeps_the_old_state_and_is_retried_on_the_next_poll() -> None:
    harness = Harness()
    harness.backlog, harness.fail_apply = 5.0, True
    await harness.autoscaler.tick("echo")
    assert harness.autoscaler.states["echo"].replicas == 0 and harness.applied == []

    harness.fail_apply = False
    await harness.autoscaler.tick("echo")
    assert harness.applied == [("echo", 1)]


async def test_a_failed_read_is_counted_and_changes_nothing() -> None:
    harness = Harness()
    harness.backlog = None
    await harness.autoscaler.tick("echo")

    assert harness.applied == []
    assert harness.sample("inferq_autoscaler_metric_read_failures_total") == 1
    assert harness.sample("inferq_autoscaler_decisions_total", rule="no-metric") == 1


async def test_a_demand_event_wakes_a_model_at_zero_at_once_and_then_only_counts_as_activity() -> None:
    """Push activation: no poll needed to leave zero; above zero the polled metric decides."""
    harness = Harness()
    await harness.autoscaler.tick("echo")  # backlog 0: stays at zero
    await harness.autoscaler.on_demand("echo")
    harness.clock.now += 5
    await harness.autoscaler.on_demand("echo")
    await harness.autoscaler.on_demand("no-such-model")

    assert harness.applied == [("echo", 1)]
    assert harness.sample("inferq_autoscaler_decisions_total", rule="push-activation") == 1
    assert harness.sample("inferq_autoscaler_decisions_total", rule="push-hold") == 1
    assert harness.autoscaler.states["echo"].last_active_s == 1005.0  # the cooldown restarts from it


async def test_a_demand_event_and_a_poll_never_apply_at_the_same_time() -> None:
    harness = Harness()
    harness.backlog = 5.0  # one replica's worth
    await asyncio.gather(harness.autoscaler.on_demand("echo"), harness.autoscaler.tick("echo"))

    assert harness.applied == [("echo", 1)]  # one of them woke it; the other saw it awake
