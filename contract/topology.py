"""Queue topology: names and arguments of every exchange and queue, as data.

Both sides declare the same specs idempotently at start, so whichever starts first
creates them and a mismatch fails loudly (PRECONDITION_FAILED) instead of drifting.
Where each component has its own broker user (a cluster: `DECLARE_TOPOLOGY=false`),
`python -m broker_access apply` declares them once as the administrator and the
components only check, passively, that what they use exists.
Delay-tier queues carry their delay in their name, so changing a schedule creates new
queues instead of clashing with the old ones.

    jobs (direct exchange) --model--> jobs.{model}            priority, no length limit
    jobs.{model}.retry.{delay}  TTL = delay, dead-letters --> jobs / {model}
    jobs.{model}.parked         permanent failures and exhausted attempts (replayable)
    callbacks                   finished jobs' events for the dispatcher
    callbacks.retry.{delay}     TTL = delay, dead-letters --> callbacks
    callbacks.parked            undeliverable events (replayable)
    events (topic exchange)     model.{model}.demand: "jobs are arriving" (transient,
                                coalesced; the local autoscaler wakes a model from 0)
    job-outcomes.{model}        (direct) what a model's worker publishes: its retry tiers,
                                its parking lot and callbacks, each bound by queue name
    callback-outcomes           (direct) what the dispatcher publishes: callbacks' retry
                                tiers and parking lot, bound by queue name

Nothing is published through the default exchange: write access to it reaches every
queue, so with the outcome exchanges each component's broker user can be granted only
the queues its role fills (`broker_access.roles`).

Broker versions: the embedded default is RabbitMQ 3.10, production clusters run 4.x.
Main queues are *classic* queues with `x-max-priority`, which both versions honour.
Quorum queues would replicate, but on 3.10 they reject `x-max-priority` outright and
on 4.x they support only two priority levels (>= 5 is "high"), so the three-level
high/normal/low contract needs classic queues on both; with quorum queues one would
also have to set `x-delivery-limit` explicitly (3.10 has no default) and
`x-dead-letter-strategy: at-least-once` (4.x). `x-overflow: reject-publish` (not the
default drop-head) would make a full queue nack new publishes instead of silently dropping
the oldest accepted jobs; but dead-lettering has no confirms, so a retry whose delay
ends while the queue is full would vanish: the main queues therefore carry no length
limit at all, and `MAX_QUEUE_LENGTH` is enforced by the ingress on new jobs only
(`ingress/admission.py`). Attempts are counted in our own header, not `x-death`
(RabbitMQ 4.x stops counting client republishes there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from contract.envelope import MAX_AMQP_PRIORITY
from contract.retry_tiers import RetrySchedule, tier_name

DEFAULT_JOB_RETRY_DELAYS_S = (1.0, 10.0, 60.0, 600.0)
# Standard Webhooks/Svix-like: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_CALLBACK_RETRY_DELAYS_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    kind: Literal["direct", "topic"]


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    # (exchange, routing key) pairs; the default exchange needs no binding.
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Topology:
    """Derives every name from an optional prefix, which isolates environments (and tests)
    sharing one virtual host, and holds the retry schedules both sides must agree on."""

    prefix: str = ""
    max_queue_length: int = 100_000
    job_retries: RetrySchedule = field(default_factory=lambda: RetrySchedule(DEFAULT_JOB_RETRY_DELAYS_S))
    job_retries_by_model: Mapping[str, RetrySchedule] = field(default_factory=dict)
    callback_retries: RetrySchedule = field(
        default_factory=lambda: RetrySchedule(DEFAULT_CALLBACK_RETRY_DELAYS_S)
    )
    # Each client declares at start (one machine, one broker user); False: a setup
    # declared it and the clients' users may not, so they only check it exists.
    declared_by_clients: bool = True

    @property
    def jobs_exchange(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def events_exchange(self) -> str:
        """Topic exchange for transient events (demand announcements), never for jobs."""
        return f"{self.prefix}events"

    @staticmethod
    def demand_key(model: str) -> str:
        return f"model.{model}.demand"

    @property
    def demand_queue(self) -> str:
        """Where the local autoscaler hears demand events."""
        return f"{self.prefix}events.demand.autoscaler"

    @property
    def push_scaler_demand_queue(self) -> str:
        """Where the KEDA push scaler hears demand events."""
        return f"{self.prefix}events.demand.push-scaler"

    def job_outcomes_exchange(self, model: str) -> str:
        """Where a model's worker publishes outcomes (retries, parked jobs, callbacks)."""
        return f"{self.prefix}job-outcomes.{model}"

    @property
    def callback_outcomes_exchange(self) -> str:
        """Where the dispatcher publishes callbacks' retries and parked callbacks."""
        return f"{self.prefix}callback-outcomes"

    def exchanges(self, models: tuple[str, ...]) -> list[ExchangeSpec]:
        return [
            ExchangeSpec(self.jobs_exchange, "direct"),
            ExchangeSpec(self.events_exchange, "topic"),
            *(ExchangeSpec(self.job_outcomes_exchange(model), "direct") for model in models),
            ExchangeSpec(self.callback_outcomes_exchange, "direct"),
        ]

    def main_queue(self, model: str) -> str:
        return f"{self.prefix}jobs.{model}"

    def parking_queue(self, model: str) -> str:
        return f"{self.prefix}jobs.{model}.parked"

    def job_retry_schedule(self, model: str) -> RetrySchedule:
        return self.job_retries_by_model.get(model, self.job_retries)

    def job_retry_queue(self, model: str, delay_s: float) -> str:
        return f"{self.prefix}jobs.{model}.retry.{tier_name(delay_s)}"

    @property
    def callbacks_queue(self) -> str:
        return f"{self.prefix}callbacks"

    def callback_retry_queue(self, delay_s: float) -> str:
        return f"{self.prefix}callbacks.retry.{tier_name(delay_s)}"

    @property
    def callbacks_parking_queue(self) -> str:
        return f"{self.prefix}callbacks.parked"

    def queues(self, models: tuple[str, ...]) -> list[QueueSpec]:
        specs: list[QueueSpec] = []
        for model in models:
            # No x-max-length: a retry dead-lettered into a full queue would be dropped
            # (dead-lettering has no confirms). MAX_QUEUE_LENGTH is the ingress's admission
            # limit on new jobs instead (ingress/admission.py); retries always come back.
            main_arguments = {"x-queue-type": "classic", "x-max-priority": MAX_AMQP_PRIORITY}
            specs.append(QueueSpec(self.main_queue(model), main_arguments, ((self.jobs_exchange, model),)))
            outcomes = self.job_outcomes_exchange(model)
            for delay_s in self.job_retry_schedule(model).distinct_delays_s():
                name = self.job_retry_queue(model, delay_s)
                specs.append(_delay_queue(name, delay_s, self.jobs_exchange, model, outcomes))
            parking = self.parking_queue(model)
            specs.append(QueueSpec(parking, {"x-queue-type": "classic"}, ((outcomes, parking),)))
        callbacks = self.callbacks_queue
        from_workers = tuple((self.job_outcomes_exchange(model), callbacks) for model in models)
        specs.append(QueueSpec(callbacks, {"x-queue-type": "classic"}, from_workers))
        for delay_s in self.callback_retries.distinct_delays_s():
            # Dead-lettered through "", the default exchange: by queue name straight back to
            # callbacks (the broker does it; no user needs write access there).
            name = self.callback_retry_queue(delay_s)
            specs.append(_delay_queue(name, delay_s, "", callbacks, self.callback_outcomes_exchange))
        parking = self.callbacks_parking_queue
        bindings = ((self.callback_outcomes_exchange, parking),)
        specs.append(QueueSpec(parking, {"x-queue-type": "classic"}, bindings))
        return specs


def _delay_queue(name: str, delay_s: float, target_exchange: str, target_key: str, fed_by: str) -> QueueSpec:
    """A delay tier: filled through `fed_by` (bound by its own name), dead-letters its
    messages to `target_exchange` with `target_key` when their TTL ends."""
    arguments = {
        "x-queue-type": "classic",
        "x-message-ttl": round(delay_s * 1000),
        "x-dead-letter-exchange": target_exchange,
        "x-dead-letter-routing-key": target_key,
    }
    return QueueSpec(name, arguments, ((fed_by, name),))
