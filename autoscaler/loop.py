"""The local autoscaler: KEDA's and the HPA's rules, applied to local Ray Serve replicas.

Each model with a ScaledObject gets its own loop: every `pollingInterval` it reads the
queue (ready + unacked, as KEDA's http protocol does), asks the pure `decide` for a
replica count, and applies a change through the injected `apply` (in the local stack:
a Serve redeploy with the new `num_replicas`; scaling down drains replicas first).
Every change is logged and the state is exported as Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from autoscaler.queue_metrics import QueueMetricUnavailable
from autoscaler.scaling_decision import Decision, ScalingState, decide, decide_on_demand
from autoscaler.scaling_policy import ScalingPolicy
from wire.job_chunk import CHUNK_JOBS

logger = logging.getLogger(__name__)

ReadMetric = Callable[[str], Awaitable[float]]
ApplyReplicas = Callable[[str, int], Awaitable[None]]


class AutoscalerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.replicas = Gauge(
            "inferq_autoscaler_replicas", "Replicas per model", ["model"], registry=registry
        )
        self.queue_messages = Gauge(
            "inferq_autoscaler_queue_messages",
            "Last queue metric read (ready + unacked jobs; a chunk counts as its jobs)",
            ["model"],
            registry=registry,
        )
        self.scale_events = Counter(
            "inferq_autoscaler_scale_events",
            "Replica count changes",
            ["model", "direction"],
            registry=registry,
        )
        self.apply_seconds = Gauge(
            "inferq_autoscaler_last_apply_seconds",
            "How long the last change took to apply",
            ["model"],
            registry=registry,
        )
        self.decisions = Counter(
            "inferq_autoscaler_decisions",
            "Decisions by the rule that made them",
            ["model", "rule"],
            registry=registry,
        )
        self.read_failures = Counter(
            "inferq_autoscaler_metric_read_failures", "Failed queue reads", ["model"], registry=registry
        )


class LocalAutoscaler:
    def __init__(
        self,
        policies: Mapping[str, ScalingPolicy],
        queues_for: Callable[[str], tuple[str, ...]],
        high_queues_for: Callable[[str], tuple[str, ...]],
        chunk_queues_for: Callable[[str], tuple[str, ...]],
        read_metric: ReadMetric,
        apply: ApplyReplicas,
        metrics: AutoscalerMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policies = policies
        self._queues_for = queues_for
        self._high_queues_for = high_queues_for
        self._chunk_queues_for = chunk_queues_for
        self._read_metric = read_metric
        self._apply = apply
        self._metrics = metrics
        self._clock = clock
        self.states: dict[str, ScalingState] = {model: ScalingState() for model in policies}
        # A poll and a demand event never apply a change for one model at the same time.
        self._locks = {model: asyncio.Lock() for model in policies}

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every model on its own interval until `stop` is set."""
        loops = [asyncio.create_task(self._loop(model, stop)) for model in self._policies]
        try:
            await stop.wait()
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _loop(self, model: str, stop: asyncio.Event) -> None:
        policy = self._policies[model]
        while not stop.is_set():
            await self.tick(model)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), policy.polling_interval_s)

    async def tick(self, model: str) -> None:
        async with self._locks[model]:
            await self._poll(model)

    async def on_demand(self, model: str) -> None:
        """A demand event for `model`: at zero it wakes now; otherwise it only counts as activity."""
        if model not in self._policies:
            return
        async with self._locks[model]:
            decision = decide_on_demand(self._policies[model], self.states[model], self._clock())
            self._metrics.decisions.labels(model, decision.rule).inc()
            await self._enact(model, decision, None)

    async def _poll(self, model: str) -> None:
        policy, state = self._policies[model], self.states[model]
        metric: float | None
        high_metric = chunk_metric = 0.0
        try:
            # KEDA's `operation: sum` over a model's queues (every lane; every priority).
            read = {queue: await self._read_metric(queue) for queue in self._queues_for(model)}
            metric = sum(read.values())
            high_metric = sum(read[queue] for queue in self._high_queues_for(model))
            chunk_metric = sum([await self._read_metric(queue) for queue in self._chunk_queues_for(model)])
            self._metrics.queue_messages.labels(model).set(metric + CHUNK_JOBS * chunk_metric)
        except QueueMetricUnavailable as exc:
            logger.warning("autoscaler %s: %s", model, exc)
            self._metrics.read_failures.labels(model).inc()
            metric = None
        decision = decide(policy, state, metric, self._clock(), high_metric, chunk_metric)
        self._metrics.decisions.labels(model, decision.rule).inc()
        await self._enact(model, decision, metric)

    async def _enact(self, model: str, decision: Decision, metric: float | None) -> None:
        """Apply the decision's replica count if it changed, then keep its state."""
        state = self.states[model]
        if decision.replicas != state.replicas:
            started = time.monotonic()
            try:
                await self._apply(model, decision.replicas)
            except Exception:
                logger.exception(
                    "autoscaler %s: applying %d replicas failed; will retry", model, decision.replicas
                )
                return
            took_s = time.monotonic() - started
            direction = "up" if decision.replicas > state.replicas else "down"
            self._metrics.scale_events.labels(model, direction).inc()
            self._metrics.apply_seconds.labels(model).set(took_s)
            logger.info(
                "autoscaler %s: %d -> %d replicas, backlog %s (%s); applied in %.1f s",
                model,
                state.replicas,
                decision.replicas,
                "?" if metric is None else f"{metric:g}",
                decision.reason,
                took_s,
            )
            if decision.replicas > state.replicas:
                # A scale-up means demand, and while the apply ran (Serve can take tens
                # of seconds under load) nothing was observed: that time must not count
                # towards the cooldown, or the next poll, reading a backlog the broker's
                # statistics have not caught up with, would scale straight back to zero.
                decision = replace(decision, state=replace(decision.state, last_active_s=self._clock()))
        self.states[model] = decision.state
        self._metrics.replicas.labels(model).set(decision.replicas)
