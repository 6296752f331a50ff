"""Queue topology: names and arguments of every exchange and queue, as data.

Both sides declare the same specs idempotently at start, so whichever starts first
creates them and a mismatch fails loudly (PRECONDITION_FAILED) instead of drifting.
Where each component has its own broker user (a cluster: `DECLARE_TOPOLOGY=false`),
`python -m broker_access apply` declares them once as the administrator and the
components only check, passively, that what they use exists.
Delay-tier queues carry their delay in their name, so changing a schedule creates new
queues instead of clashing with the old ones.

    jobs (direct exchange) --model--> jobs.{model}            normal and low, no length limit
                           --{model}.high--> jobs.{model}.high   high, counted apart for scaling
                           --{model}[.high].lane{k}--> jobs.{model}[.high].lane{k}
                                                     tenant lanes 1..N-1
                                (quorum: --{model}.{priority}[.lane{k}]-->
                                 jobs.{model}.{priority}[.lane{k}])
    jobs.{model}.retry.{delay}  TTL = delay, dead-letters --> jobs / {model}
                                (quorum: one per priority, .{priority})
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

Two queue types, one setting (`QUEUE_TYPE`), the same names everywhere else:

- `classic` (the default; one machine): a model's normal and low jobs wait in one classic
  queue with `x-max-priority`, which RabbitMQ 3.10 and 4.x both honour; its high jobs in
  a queue of their own beside it, so that a high backlog can be counted apart and scale
  the model sooner (`manifests.scaled_objects`); the worker serves high first either
  way. A retry of any priority waits in the delay tiers and comes back to the first
  queue (with its AMQP priority). Not replicated: the queues live on one node.
- `quorum` (a cluster of nodes): every queue is a replicated quorum queue. Quorum queues
  refuse `x-max-priority` on 3.10 and have two levels on 4.x, so the three levels are
  three queues, `jobs.{model}.high|normal|low` (routing key `{model}.{priority}`), each
  with its own delay tiers `jobs.{model}.retry.{delay}.{priority}` that dead-letter back
  to it; the worker consumes all three and serves high first (`ray_workers.priority_inbox`).
  A message delivered DELIVERY_LIMIT times is dead-lettered to the parking lot
  (`x-delivery-limit`: 3.10 has no default), and every dead-lettering is
  `at-least-once` (with the `reject-publish` overflow it needs), so a retry whose delay
  ends is never dropped on its way back.

Tenant lanes (`TENANT_LANES`, N): a model's jobs wait in N queues per priority level,
lane 0 under the names above and lanes 1..N-1 beside it (`.lane{k}`). The ingress puts
each tenant's new jobs in one lane (`ingress.tenant_lanes`: the lane fewest active
tenants hold), so one tenant's backlog is not a FIFO every other tenant waits behind;
the worker consumes every lane and serves tenants in proportion to their weights
(`ray_workers.priority_inbox`). Retries and replays come back to lane 0: the delay
tiers and the parking lot are the model's (per priority), not the lane's.

Classic job queues are of classic-queue version 2 (`CLASSIC_QUEUE_VERSION`, default 2):
a persistent job's publish, which its 202 waits for, is confirmed 0.5-0.8 ms sooner than
by version 1 on RabbitMQ 3.10; the job reaches its worker about 0.4 ms later, and the
broker spends about 25 us more per job (figures: docs/pages/performance.md). Only the
job and chunk queues carry it: nothing waits on the others' confirms at low load. A job queue that an
older version declared without it keeps version 1 and keeps working (`broker.client`
says so at start); the `queue-version` policy converts it in place.

Switching type is one setting; the parking lots, callbacks and their tiers keep their
names, so a broker holding the other type refuses the declaration
(PRECONDITION_FAILED, `TopologyMismatch`) instead of mixing them.

No queue carries a length limit: a retry dead-lettered into a full classic queue would
vanish (classic dead-lettering has no confirms), so `MAX_QUEUE_LENGTH` is enforced by
the ingress on new jobs only (`ingress/admission.py`) and retries always come back.
Attempts are counted in our own header, not `x-death` (RabbitMQ 4.x stops counting
client republishes there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from wire.envelope import MAX_AMQP_PRIORITY, Priority
from wire.job_chunk import CHUNK_JOBS
from wire.retry_tiers import RetrySchedule, tier_name

QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: tuple[QueueType, ...] = ("classic", "quorum")
ClassicQueueVersion = Literal[1, 2]
CLASSIC_QUEUE_VERSIONS: tuple[ClassicQueueVersion, ...] = (1, 2)
# The queue argument that picks a classic queue's version; version 1 is declared without it.
QUEUE_VERSION_ARGUMENT = "x-queue-version"
# The order a worker serves them in.
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
# Quorum queues: a message delivered this many times (say, a job that kills its consumer
# again and again) is dead-lettered to the parking lot. Generous, because a breaker giving
# prefetched jobs back and a node failing over count as deliveries too.
DELIVERY_LIMIT = 20
DEFAULT_JOB_RETRY_DELAYS_S = (1.0, 10.0, 60.0, 600.0)
# Standard Webhooks/Svix-like: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_CALLBACK_RETRY_DELAYS_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
# Queues per model and priority that tenants' new jobs are spread over (TENANT_LANES).
DEFAULT_TENANT_LANES = 4
MAX_TENANT_LANES = 32
# A chunk queue's name: its jobs' queue's, and this (`wire.job_chunk`).
CHUNK_SUFFIX = ".chunks"


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
    queue_type: QueueType = "classic"
    tenant_lanes: int = DEFAULT_TENANT_LANES
    classic_queue_version: ClassicQueueVersion = 2

    def __post_init__(self) -> None:
        if not 1 <= self.tenant_lanes <= MAX_TENANT_LANES:
            raise ValueError(f"tenant_lanes={self.tenant_lanes}: 1 to {MAX_TENANT_LANES}")
        if self.classic_queue_version not in CLASSIC_QUEUE_VERSIONS:
            raise ValueError(f"classic_queue_version={self.classic_queue_version}: 1 or 2")

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
        """Where the KEDA push scaler hears demand events; each instance of several
        (`PUSH_SCALER_INSTANCE`, a pod's name) on a queue of its own beneath it."""
        return f"{self.prefix}events.demand.push-scaler"

    def push_scaler_instance_queue(self, instance: str) -> str:
        """One push scaler's own queue: every instance hears every demand event (replicas
        sharing one queue would each hear a part)."""
        return f"{self.push_scaler_demand_queue}.{instance}" if instance else self.push_scaler_demand_queue

    @property
    def replicated(self) -> bool:
        """Quorum queues: their consumers take a prefetch of their own, fixed while they run."""
        return self.queue_type == "quorum"

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
        """The classic topology's queue of a model's normal and low jobs (lane 0)."""
        return f"{self.prefix}jobs.{model}"

    def _level(self, priority: Priority) -> str:
        """The part of a queue's name (and key) a priority adds: classic topology's normal
        and low share a priority queue, every other level has its own."""
        return "" if self.queue_type == "classic" and priority != "high" else f".{priority}"

    def job_queue(self, model: str, priority: Priority, lane: int = 0) -> str:
        """Where a job of this priority waits in `lane`: classic normal and low in the
        model's priority queue, every other level in its own; lanes past 0 carry their number."""
        base = f"{self.main_queue(model)}{self._level(priority)}"
        return base if lane == 0 else f"{base}.lane{lane}"

    def job_queues(self, model: str) -> tuple[str, ...]:
        """Every queue a model's jobs wait in, highest priority first, every lane (what a
        worker consumes and what its backlog sums)."""
        return tuple(
            dict.fromkeys(
                self.job_queue(model, priority, lane)
                for priority in PRIORITIES
                for lane in range(self.tenant_lanes)
            )
        )

    def high_queues(self, model: str) -> tuple[str, ...]:
        """Where high-priority jobs wait, every lane (what the high-priority trigger counts)."""
        return tuple(self.job_queue(model, "high", lane) for lane in range(self.tenant_lanes))

    def lane_queues(self, model: str, lane: int) -> tuple[str, ...]:
        """The queues of one lane, every priority (what its depth sums)."""
        return tuple(dict.fromkeys(self.job_queue(model, priority, lane) for priority in PRIORITIES))

    def chunk_queue(self, model: str, priority: Priority, lane: int = 0) -> str:
        """Where full chunks of a batch's jobs of this priority wait in `lane`
        (`wire.job_chunk`): beside the jobs' queue, counted as CHUNK_JOBS jobs a message."""
        return f"{self.job_queue(model, priority, lane)}{CHUNK_SUFFIX}"

    def chunk_queues(self, model: str) -> tuple[str, ...]:
        """Every chunk queue of a model, in the order of `job_queues`."""
        return tuple(f"{queue}{CHUNK_SUFFIX}" for queue in self.job_queues(model))

    def counted_queues(self, model: str) -> tuple[tuple[str, int], ...]:
        """Every queue a model's waiting jobs are in, with the jobs each of its messages
        is (1, or CHUNK_JOBS for a chunk): what a count of its backlog sums."""
        return _with_chunk_queues(self.job_queues(model))

    def lane_counted_queues(self, model: str, lane: int) -> tuple[tuple[str, int], ...]:
        """`counted_queues` of one lane."""
        return _with_chunk_queues(self.lane_queues(model, lane))

    def chunk_routing_key(self, model: str, priority: Priority, lane: int = 0) -> str:
        return f"{self.job_routing_key(model, priority, lane)}{CHUNK_SUFFIX}"

    def job_routing_key(self, model: str, priority: Priority, lane: int = 0) -> str:
        """The key a job is published with on the jobs exchange."""
        base = f"{model}{self._level(priority)}"
        return base if lane == 0 else f"{base}.lane{lane}"

    def parking_queue(self, model: str) -> str:
        return f"{self.prefix}jobs.{model}.parked"

    def job_retry_schedule(self, model: str) -> RetrySchedule:
        return self.job_retries_by_model.get(model, self.job_retries)

    def job_retry_queue(self, model: str, delay_s: float, priority: Priority) -> str:
        """A delay tier; the quorum topology has one per priority, since each dead-letters
        back to its own priority's queue."""
        tier = f"{self.prefix}jobs.{model}.retry.{tier_name(delay_s)}"
        return tier if self.queue_type == "classic" else f"{tier}.{priority}"

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
            specs += self._model_queues(model)
        callbacks = self.callbacks_queue
        from_workers = tuple((self.job_outcomes_exchange(model), callbacks) for model in models)
        dead_letters = self._dead_letters(self.callback_outcomes_exchange, self.callbacks_parking_queue)
        specs.append(QueueSpec(callbacks, self._kind() | dead_letters, from_workers))
        for delay_s in self.callback_retries.distinct_delays_s():
            # Dead-lettered through "", the default exchange: by queue name straight back to
            # callbacks (the broker does it; no user needs write access there).
            name = self.callback_retry_queue(delay_s)
            specs.append(self._delay_queue(name, delay_s, "", callbacks, self.callback_outcomes_exchange))
        parking = self.callbacks_parking_queue
        bindings = ((self.callback_outcomes_exchange, parking),)
        specs.append(QueueSpec(parking, self._kind(), bindings))
        return specs

    def _model_queues(self, model: str) -> list[QueueSpec]:
        # No x-max-length: a retry dead-lettered into a full queue would be dropped (classic
        # dead-lettering has no confirms). MAX_QUEUE_LENGTH is the ingress's admission limit
        # on new jobs instead (ingress/admission.py); retries always come back.
        outcomes, parking = self.job_outcomes_exchange(model), self.parking_queue(model)
        if self.queue_type == "classic":
            arguments = self._kind() | {"x-max-priority": MAX_AMQP_PRIORITY} | self._version()
        else:
            arguments = self._kind() | self._dead_letters(outcomes, parking)
        specs = []
        for priority in PRIORITIES if self.replicated else ("high", "normal"):
            for lane in range(self.tenant_lanes):
                lane_key = self.job_routing_key(model, priority, lane)
                lane_queue = self.job_queue(model, priority, lane)
                specs.append(QueueSpec(lane_queue, arguments, ((self.jobs_exchange, lane_key),)))
                chunk_key = self.chunk_routing_key(model, priority, lane)
                chunk_queue = self.chunk_queue(model, priority, lane)
                specs.append(QueueSpec(chunk_queue, arguments, ((self.jobs_exchange, chunk_key),)))
            if priority == "high" and not self.replicated:
                continue  # classic: one set of delay tiers, back to the normal queue
            # Delay tiers dead-letter back to lane 0: a retry waits in the model's queue.
            key = self.job_routing_key(model, priority)
            for delay_s in self.job_retry_schedule(model).distinct_delays_s():
                name = self.job_retry_queue(model, delay_s, priority)
                specs.append(self._delay_queue(name, delay_s, self.jobs_exchange, key, outcomes))
        specs.append(QueueSpec(parking, self._kind(), ((outcomes, parking),)))
        return specs

    def _kind(self) -> dict[str, Any]:
        return {"x-queue-type": self.queue_type}

    def _version(self) -> dict[str, Any]:
        """A classic job queue's version argument; none for version 1, as queues were
        declared before version 2 (so that they still match)."""
        return {} if self.classic_queue_version == 1 else {QUEUE_VERSION_ARGUMENT: self.classic_queue_version}

    def _dead_letters(self, exchange: str, routing_key: str) -> dict[str, Any]:
        """Quorum only: a message delivered DELIVERY_LIMIT times goes to `routing_key`
        (a parking lot), dead-lettered at-least-once (which needs reject-publish)."""
        if self.queue_type == "classic":
            return {}
        return {
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": routing_key,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def _delay_queue(
        self, name: str, delay_s: float, target_exchange: str, target_key: str, fed_by: str
    ) -> QueueSpec:
        """A delay tier: filled through `fed_by` (bound by its own name), dead-letters its
        messages to `target_exchange` with `target_key` when their TTL ends (at-least-once
        on the quorum topology: an expiring retry is never dropped)."""
        arguments = self._kind() | {
            "x-message-ttl": round(delay_s * 1000),
            "x-dead-letter-exchange": target_exchange,
            "x-dead-letter-routing-key": target_key,
        }
        if self.replicated:
            arguments |= {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        return QueueSpec(name, arguments, ((fed_by, name),))


def _with_chunk_queues(queues: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """`queues`, a job a message, then the chunk queue beside each, CHUNK_JOBS a message."""
    return tuple((queue, 1) for queue in queues) + tuple(
        (f"{queue}{CHUNK_SUFFIX}", CHUNK_JOBS) for queue in queues
    )
