"""Job records in Redis: what became of each job, first terminal write wins.

The broker is the source of truth for *work*; this store is the source of truth for a
job's *story*, which the caller reads (`GET /v1/jobs/{id}`), waits on (`Prefer: wait`)
and cancels. Every state change is one Lua script, so it is atomic:

    create   (ingress, before the publish)  -> queued, unless the record already moved on
    start    (worker, before the model)     -> running; answers a canceled or finished
                                               status instead, and the job is not run
    finish   (worker)                       -> succeeded | failed | expired; the first
                                               terminal write wins, later ones learn it
    cancel   (ingress)                      -> canceled, only from queued
    delivery (dispatcher)                   -> the callback's state and attempts

So a job can never read as both succeeded and failed, a redelivered copy of a finished
job is not run again (it sends the recorded ending again), and cancel racing the worker
has one winner. A record
written by `start` or `finish` when `create` could not run (Redis was down at submit)
carries the same fields, taken from the job itself.

Waiting costs no polling: `finish` and `cancel` PUBLISH the job id on one channel, and
each ingress keeps a single subscriber (`finished_jobs`) that wakes its waiters.

The callback express lane's Redis side lives here too (callbacks.express_lane): `finish`
puts an offered event (`ExpressOffer`) on the lane's list in the same script that records
the ending, while a dispatcher holds the lane open; `pop_express`, `take_express` and
`settle_express` decide which copy of the event sends it.

Idempotency keys (`reserve_key` / `complete_key` / `release_key`) live here too: a key
is `accepting` while its first request is being accepted (a short lease, so a crashed
ingress does not block the key for a day), then `done` with the job id and status code,
or `uncertain` when the job's publish was written but never confirmed: the next request
with the key takes it over and sends the same job id again, so a retry never makes a
second job (at worst two copies of one, and the records let one of them end it).

Queue position is rough by design: per model and priority the store counts jobs
submitted and jobs started (or canceled); a queued job's position is the jobs of its priority
submitted before it and not started, plus every job of a higher priority not started.
Jobs that vanish without starting (expired records, lost ingress writes) make it drift;
it is clamped at 1. The completion rate behind the ETA is counted in 10 s buckets over
the last minute, over the buckets with completions only (the rate while the model
worked, not diluted by idle time).

`REDIS_URL` may name sentinels (`redis+sentinel://`, job_records.sentinel_url): the store
then talks to the primary they name, and asks them again after a failover (a connection
to a primary since demoted fails once, then finds the new one).

The one home of redis-py: its errors become `RecordsUnavailable`. After a failure the
store is skipped for RECORDS_RETRY_S (a breaker), so a Redis that is gone costs each
call nothing, not a connect timeout. Keys are `{QUEUE_PREFIX}inferq:...`; records
expire after RESULT_TTL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio
import redis.asyncio.sentinel
import redis.exceptions

from broker.client import redact_url
from job_records import scripts
from job_records.sentinel_url import is_sentinel_url, parse_sentinel_url
from policies.circuit_breaker import CircuitBreaker
from wire.envelope import AMQP_PRIORITY, Job, OutputRef

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "expired", "canceled"})
RECORDS_RETRY_S = 5.0
RATE_BUCKET_S = 10
RATE_WINDOW_BUCKETS = 6
KEY_LEASE_S = 60
QUIET_TICK_S = 1.0
# Past this, a canceled job's callback still pending is the worker's to send: the
# ingress publishes it within its publish timeout (10 s) or hands it over.
CANCEL_HANDOFF_S = 60
# Outputs larger than this (JSON bytes) are not kept in a record (RECORD_OUTPUT_MAX_BYTES).
DEFAULT_RECORD_OUTPUT_MAX_BYTES = 256 * 1024
_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)


class RecordsUnavailable(Exception):
    """Redis did not answer (or failed moments ago: `skipped`)."""

    def __init__(self, message: str, skipped: bool = False) -> None:
        super().__init__(message)
        self.skipped = skipped


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A job's record as stored; `output` and `error` once it is terminal."""

    id: str
    status: str
    model: str
    priority: str
    owner: str
    attempts: int
    created_ms: int | None
    started_ms: int | None
    finished_ms: int | None
    callback_url: str | None
    delivery: str
    delivery_attempts: int
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    input_ref: str | None = None
    output: Any = None
    # Set instead of `output` when it was over RECORD_OUTPUT_MAX_BYTES: its size, in bytes.
    output_omitted_bytes: int | None = None
    # Set instead of `output` when the worker stored it (OUTPUT_INLINE_MAX_BYTES).
    output_ref: OutputRef | None = None
    # A canceled job's job.canceled was confirmed queued by the ingress that canceled it.
    canceled_sent: bool = False
    error: str | None = None
    seq: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Placement:
    """Where a queued job stands: jobs ahead of it plus itself, and the model's recent rate."""

    queue_position: int
    completions_per_s: float

    @property
    def eta_s(self) -> float | None:
        if self.completions_per_s <= 0:
            return None
        return round(self.queue_position / self.completions_per_s, 1)


@dataclass(frozen=True)
class TokenTake:
    """What a tenant's bucket said: whether the tokens were taken, how many are left, and
    how long until the ones wanted would be there."""

    taken: bool
    left: float
    wait_s: float


@dataclass(frozen=True)
class Started:
    """What `start` found: `running` (run it), or the status that says not to, with the
    ending recorded for it (so a redelivered copy can send that ending again)."""

    status: str
    delivery: str = ""
    finished_ms: int = 0
    attempts: int = 0
    output: Any = None
    error: str | None = None

    def owes_canceled_callback(self, now_ms: int) -> bool:
        """Canceled, and its job.canceled is the worker's to send: the ingress handed it
        over (`unsent`), or it is long overdue (an ingress that died before publishing)."""
        if self.status != "canceled":
            return False
        return self.delivery == "unsent" or (
            self.delivery == "pending" and now_ms - self.finished_ms > CANCEL_HANDOFF_S * 1000
        )


# What `finish` records of a job: (job, status, attempts, output, error).
Ending = tuple[Job, str, int, Any, str | None]

# The express lane's list holds at most this many events: a dispatcher that stopped
# popping (or cannot keep up) leaves the rest to their broker copies.
EXPRESS_LANE_LONGEST = 64
# Larger callback events are not offered to the lane: its list lives in Redis's memory.
EXPRESS_EVENT_MAX_BYTES = 16 * 1024
# A delivered or failed express mark waits this long for its broker copy to read it; one
# not read by then (that copy lost with its worker) is only memory.
EXPRESS_MARK_KEEP_S = 3600


@dataclass
class ExpressOffer:
    """Callback events offered to the express lane with their jobs' endings (job id -> the
    event as its broker copy carries it); after `finish` or `start_and_finish`, `pushed`
    names the jobs whose event went onto the lane (job_records.scripts.FINISH)."""

    events: Mapping[str, bytes]
    pushed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeyClaim:
    """What an Idempotency-Key's reservation found: `new`, `mismatch`, `in_flight`, `replay`,
    or `uncertain` (an earlier request's job may be queued: it goes out again as `job_id`)."""

    outcome: str
    job_id: str = ""
    status_code: int = 0


class JobFacts(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a record keeps of the job itself: fixed at submission, stored as one field."""

    model: str
    priority: str
    owner: str
    created_ms: int
    callback_url: str | None
    metadata: dict[str, Any]
    # The upload the job names instead of an inline input: deleted when it is canceled.
    input_ref: str | None = None


def job_fields(job: Job) -> dict[str, str]:
    """The fields any writer may fill in when the record lacks them (two, to keep every
    script's arguments few: their encoding is most of a call's cost)."""
    facts = JobFacts(
        job.model, job.priority, job.owner, job.submitted_at_ms, job.callback_url, job.metadata, job.input_ref
    )
    return {"job": _json(facts), "delivery": "pending" if job.callback_url else "none"}


def _client(url: str, timeout_s: float) -> tuple[redis.asyncio.Redis, list[redis.asyncio.Redis]]:
    """A client of the Redis `url` names, or of the primary its sentinels name; and the
    sentinels' clients (closed with it)."""
    if not is_sentinel_url(url):
        client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        return client, []
    address = parse_sentinel_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(
        address.sentinels,
        sentinel_kwargs={
            "password": address.password,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        },
    )
    primary: redis.asyncio.Redis = sentinel.master_for(
        address.primary_name,
        db=address.db,
        password=address.password,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        decode_responses=True,
    )
    return primary, list(sentinel.sentinels)


class JobRecords:
    def __init__(
        self,
        url: str,
        key_prefix: str,
        ttl_s: int,
        timeout_s: float = 1.0,
        max_output_bytes: int = DEFAULT_RECORD_OUTPUT_MAX_BYTES,
    ) -> None:
        self._max_output_bytes = max_output_bytes
        self._display_url = redact_url(url)
        self._redis, self._sentinels = _client(url, timeout_s)
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in {
                "create": scripts.CREATE,
                "place": scripts.PLACE,
                "start": scripts.START,
                "finish": scripts.FINISH,
                "start_and_finish": scripts.START_AND_FINISH,
                "cancel": scripts.CANCEL,
                "update_if": scripts.UPDATE_IF,
                "record_delivery": scripts.RECORD_DELIVERY,
                "reopen": scripts.REOPEN,
                "fenced_key": scripts.FENCED_KEY,
                "reserve": scripts.RESERVE,
                "take_tokens": scripts.TAKE_TOKENS,
                "queued_reserve": scripts.QUEUED_RESERVE,
                "lane_lease": scripts.LANE_LEASE,
                "express_take": scripts.EXPRESS_TAKE,
            }.items()
        }
        self._prefix = f"{key_prefix}inferq:"
        self.finished_channel = f"{self._prefix}finished"
        self._ttl_s = ttl_s
        self._breaker = CircuitBreaker(failure_threshold=1, cooldown_s=RECORDS_RETRY_S)

    def __repr__(self) -> str:
        return f"JobRecords({self._display_url})"

    def failed_within(self, seconds: float) -> bool:
        """Whether a call to Redis failed in the last `seconds` (records may be on their way)."""
        last = self._breaker.last_failure_at
        return last > 0 and self._breaker.clock() - last < seconds

    def _record_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _counter_key(self, kind: str, model: str, priority: str) -> str:
        return _counter_key(self._prefix, kind, model, priority)

    def _express_mark_key(self, job_id: str) -> str:
        return f"{self._prefix}express:job:{job_id}"

    @property
    def _express_open_key(self) -> str:
        return f"{self._prefix}express:open"

    @property
    def _express_lane_key(self) -> str:
        return f"{self._prefix}express:lane"

    def _queued_key(self, owner: str) -> str:
        """The owner's jobs queued or running, for its max_queued."""
        return f"{self._prefix}queued:{owner}"

    def _rate_key(self, model: str, now_s: float) -> str:
        return _rate_key(self._prefix, model, int(now_s) // RATE_BUCKET_S)

    async def create(self, jobs: Sequence[Job]) -> list[Placement]:
        """Record jobs about to be published as queued (one script for all of them);
        returns where each stands."""
        groups: dict[tuple[str, str], tuple[int, int]] = {}
        group_keys: list[str] = []
        per_job: list[list[str | int]] = []
        for job in jobs:
            group = groups.get((job.model, job.priority))
            if group is None:
                placement_keys, levels = self._placement_keys(job.model, job.priority)
                group = groups[(job.model, job.priority)] = (len(groups), levels)
                group_keys += placement_keys
            per_job.append([*group, self.ttl_for(job), "status", "queued", *_flat(job_fields(job))])
        keys = group_keys + [self._record_key(job.id) for job in jobs]
        args: list[str | int] = [len(per_job[0]), len(groups)]
        args += [arg for job_args in per_job for arg in job_args]
        async with self._guarded("create records in"):
            results = await self._scripts["create"](keys=keys, args=args)
        return [self._placement(int(waiting), int(done), int(active)) for waiting, done, active in results]

    def ttl_for(self, job: Job, now_ms: int | None = None) -> int:
        """Seconds a queued job's record (and its Idempotency-Key) is kept: RESULT_TTL_S, plus
        however long the job may still wait (its `ttl_s`), so a job that waits days is not
        404 while it waits, and its key does not lapse before it ran."""
        if job.deadline_ms is None:
            return self._ttl_s
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return self._ttl_s + max(0, (job.deadline_ms - now_ms + 999) // 1000)

    def _placement_keys(self, model: str, priority: str) -> tuple[tuple[str, ...], int]:
        """The 12 keys a placement reads and how many priority levels it counts: its own
        and the higher ones."""
        bucket = int(time.time()) // RATE_BUCKET_S
        return _placement_keys(self._prefix, model, priority, bucket)

    @staticmethod
    def _placement(waiting: int, done: int, active_buckets: int) -> Placement:
        # The rate while the model worked: completions over the buckets that had any, so
        # a model idle most of the minute is not taken for a slow one.
        return Placement(max(1, waiting), done / (max(1, active_buckets) * RATE_BUCKET_S))

    async def discard(self, *jobs: Job) -> None:
        """Undo `create` for jobs the broker did not take (the counters stay balanced)."""
        async with self._guarded("discard a record in"), self._redis.pipeline(transaction=True) as pipe:
            for job in jobs:
                pipe.delete(self._record_key(job.id))
                pipe.incr(self._counter_key("started", job.model, job.priority))
            await pipe.execute()

    async def start(self, jobs: Sequence[tuple[Job, int]], now_ms: int) -> dict[str, Started]:
        """Mark each (job, attempt) running; returns per job `running`, or the canceled or
        terminal status that means the job must not run. One round trip, one script."""
        if not jobs:
            return {}
        keys, args = self._start_call(jobs, now_ms)
        async with self._guarded("start jobs in"):
            results = await self._scripts["start"](keys=keys, args=args)
        return {job.id: _started_from(r) for (job, _), r in zip(jobs, results, strict=True)}

    async def finish(self, endings: Sequence[Ending], express: ExpressOffer | None = None) -> dict[str, str]:
        """Claim each (job, status, attempts, output, error) as the job's end; returns the
        status each job is recorded with now (its own where the claim won). One round trip.
        An ending claimed here puts its job's `express` event onto the lane if one is open."""
        if not endings:
            return {}
        keys, args = self._finish_call(endings, express)
        async with self._guarded("finish jobs in"):
            results, pushed = await self._scripts["finish"](keys=keys, args=args)
        if express is not None:
            express.pushed = frozenset(pushed)
        return {job.id: str(result) for (job, *_), result in zip(endings, results, strict=True)}

    async def start_and_finish(
        self,
        jobs: Sequence[tuple[Job, int]],
        now_ms: int,
        endings: Sequence[Ending],
        express: ExpressOffer | None = None,
    ) -> tuple[dict[str, Started], dict[str, str]]:
        """`start`, then `finish`, in one round trip: for a batch that already ran. A job
        that `start` finds ended or canceled keeps that status (`finish` never overwrites
        an ending), so the caller drops the ending it ran to."""
        if not jobs:
            return {}, {}
        start_keys, start_args = self._start_call(jobs, now_ms)
        finish_keys, finish_args = self._finish_call(endings, express)
        keys = start_keys + finish_keys
        args: list[str | bytes | int] = [len(start_keys), len(start_args), *start_args, *finish_args]
        async with self._guarded("start and finish jobs in"):
            started, (finished, pushed) = await self._scripts["start_and_finish"](keys=keys, args=args)
        if express is not None:
            express.pushed = frozenset(pushed)
        return (
            {job.id: _started_from(r) for (job, _), r in zip(jobs, started, strict=True)},
            {job.id: str(result) for (job, *_), result in zip(endings, finished, strict=True)},
        )

    def _start_call(self, jobs: Sequence[tuple[Job, int]], now_ms: int) -> tuple[list[str], list[str | int]]:
        """START's keys and arguments."""
        keys: list[str] = []
        per_job: list[list[str | int]] = []
        for job, attempt in jobs:
            keys += [self._record_key(job.id), self._counter_key("started", job.model, job.priority)]
            per_job.append([attempt, *_flat(job_fields(job))])
        args: list[str | int] = [self._ttl_s, now_ms, len(per_job[0])]
        args += [arg for job_args in per_job for arg in job_args]
        return keys, args

    def _finish_call(
        self, endings: Sequence[Ending], express: ExpressOffer | None = None
    ) -> tuple[list[str], list[str | bytes | int]]:
        """FINISH's keys and arguments (none without endings)."""
        if not endings:
            return [], []
        now_s = time.time()
        offered = express.events if express is not None else {}
        keys: list[str] = []
        per_job: list[list[str | bytes | int]] = []
        for job, status, attempts, output, error in endings:
            field, value = ("error", error) if error is not None else self._output_field(output)
            keys += [
                self._record_key(job.id),
                self._rate_key(job.model, now_s),
                self._queued_key(job.owner),
                self._express_mark_key(job.id),
            ]
            event = offered.get(job.id, b"")
            per_job.append([status, attempts, field, value, job.id, event, *_flat(job_fields(job))])
        keys += [self._express_open_key, self._express_lane_key]
        args: list[str | bytes | int] = [
            self._ttl_s,
            int(now_s * 1000),
            self.finished_channel,
            len(per_job[0]),
            EXPRESS_LANE_LONGEST,
        ]
        args += [arg for job_args in per_job for arg in job_args]
        return keys, args

    def _output_field(self, output: Any) -> tuple[str, str]:
        """The output as stored, or its size alone when over the cap: a record lives for
        RESULT_TTL_S in Redis's memory, and a large output goes by callback only. An
        output in the object store is kept as its reference."""
        if isinstance(output, OutputRef):
            return "output_ref", _json(output)
        encoded = _json(output)
        if len(encoded) > self._max_output_bytes:
            return "output_omitted_bytes", str(len(encoded))
        return "output", encoded

    async def cancel(self, record: JobRecord, now_ms: int | None = None) -> tuple[bool, str]:
        """Cancel a queued job at `now_ms` (default: now): (True, `canceled`), or (False,
        the status that kept it from it)."""
        keys = [
            self._record_key(record.id),
            self._counter_key("started", record.model, record.priority),
            self._queued_key(record.owner),
        ]
        finished_ms = int(time.time() * 1000) if now_ms is None else now_ms
        async with self._guarded("cancel in"):
            won, status = await self._scripts["cancel"](
                keys=keys, args=[finished_ms, self.finished_channel, record.id]
            )
        return bool(won), str(status)

    async def take_tokens(self, tenant: str, rate_per_s: float, burst: int, wanted: int) -> TokenTake:
        """Take `wanted` tokens from the tenant's bucket, or none (`taken` False)."""
        async with self._guarded("take tokens in"):
            taken, left, wait_ms = await self._scripts["take_tokens"](
                keys=[f"{self._prefix}bucket:{tenant}"], args=[rate_per_s, burst, wanted]
            )
        return TokenTake(bool(taken), float(left), int(wait_ms) / 1000)

    async def reserve_queued(self, owner: str, job_ids: Sequence[str], max_queued: int) -> tuple[bool, int]:
        """Count the jobs in against the owner's max_queued, all or none: (reserved, jobs held)."""
        until_ms = int((time.time() + self._ttl_s) * 1000)
        async with self._guarded("reserve queued jobs in"):
            reserved, held = await self._scripts["queued_reserve"](
                keys=[self._queued_key(owner)],
                args=[max_queued, int(time.time() * 1000), until_ms, *job_ids],
            )
        return bool(reserved), int(held)

    async def release_queued(self, owner: str, job_ids: Sequence[str]) -> None:
        """Jobs not queued after all: they do not count against max_queued."""
        async with self._guarded("release queued jobs in"):
            await self._redis.zrem(self._queued_key(owner), *job_ids)

    async def lease_lane(self, model: str, tenant: str, lease_s: float, depths: Sequence[int]) -> int:
        """The lane the tenant's new jobs of `model` go to, its lease renewed for `lease_s`;
        a tenant without one takes the lane fewest tenants hold, the shallowest of those."""
        async with self._guarded("lease a lane in"):
            lane = await self._scripts["lane_lease"](
                keys=[f"{self._prefix}lanes:{model}"],
                args=[tenant, round(lease_s * 1000), len(depths), *depths],
            )
        return int(lane)

    async def record_delivery(self, updates: Sequence[tuple[str, str, int]]) -> None:
        """Set (job id, delivery state, attempts); one round trip, one script. A record
        that does not exist yet gets these fields only, and its TTL."""
        if not updates:
            return
        keys = [self._record_key(job_id) for job_id, _, _ in updates]
        args: list[str | int] = [self._ttl_s]
        for _, state, attempts in updates:
            args += [state, attempts]
        async with self._guarded("record deliveries in"):
            await self._scripts["record_delivery"](keys=keys, args=args)

    async def open_express_lane(self, lease_s: float, for_s: float) -> None:
        """Hold the express lane open for `for_s`: endings recorded meanwhile put their
        offered events onto it, each marked `pushed` for `lease_s` (how long its broker
        copy waits for the lane's outcome before sending the event itself)."""
        async with self._guarded("open the express lane in"):
            await self._redis.set(self._express_open_key, round(lease_s * 1000), px=round(for_s * 1000))

    async def close_express_lane(self) -> None:
        async with self._guarded("close the express lane in"):
            await self._redis.delete(self._express_open_key)

    async def pop_express(self, timeout_s: float) -> bytes | None:
        """The lane's next event, waiting up to `timeout_s` (under the client's socket
        timeout) for one; once popped it is this caller's to send."""
        async with self._guarded("pop the express lane in"):
            popped = await self._redis.blpop([self._express_lane_key], timeout=timeout_s)
        return None if popped is None else str(popped[1]).encode()

    async def take_express(self, job_id: str, event: bytes) -> str:
        """What the broker copy of an offered event does (scripts.EXPRESS_TAKE): `take`
        (send it), `pushed` (the lane is sending it: ask again), or the lane's outcome."""
        async with self._guarded("read the express lane in"):
            return str(
                await self._scripts["express_take"](
                    keys=[self._express_lane_key, self._express_mark_key(job_id)], args=[event]
                )
            )

    async def settle_express(self, job_id: str, outcome: str) -> None:
        """The lane's outcome for the job's event, for its broker copy to read; none is
        written once the mark's lease ran out (the copy sends the event itself then)."""
        async with self._guarded("settle the express lane in"):
            await self._redis.set(self._express_mark_key(job_id), outcome, xx=True, ex=EXPRESS_MARK_KEEP_S)

    async def note_canceled_sent(self, job_id: str) -> None:
        """The job.canceled of a canceled job is queued: a repeated cancel need not send it."""
        async with self._guarded("update"):
            await self._scripts["update_if"](
                keys=[self._record_key(job_id)], args=["status", "canceled", "canceled", "canceled_sent", "1"]
            )

    async def hand_cancel_to_worker(self, job_id: str) -> None:
        """The ingress could not queue the job.canceled callback: the worker sends it."""
        async with self._guarded("update"):
            await self._scripts["update_if"](
                keys=[self._record_key(job_id)], args=["delivery", "pending", "unsent"]
            )

    async def reopen(self, job_id: str) -> str | None:
        """A replayed job runs again on purpose: back to queued, its ending cleared. Only a
        job that ended in failure (failed, expired) or has no record is reopened; else the
        status that keeps it from it (succeeded, canceled, queued, running)."""
        async with self._guarded("reopen a record in"):
            status = await self._scripts["reopen"](keys=[self._record_key(job_id)], args=[])
        return None if status == "reopened" else str(status)

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._guarded("read"):
            fields: dict[str, str] = await self._redis.hgetall(self._record_key(job_id))  # type: ignore[assignment]
        return _record_from(job_id, fields) if fields.get("status") else None

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Several records in one round trip, in the order asked."""
        async with self._guarded("read"), self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self._record_key(job_id))
            found: list[dict[str, str]] = await pipe.execute()
        return [
            _record_from(job_id, fields) if fields.get("status") else None
            for job_id, fields in zip(job_ids, found, strict=True)
        ]

    async def placement(self, record: JobRecord) -> Placement:
        """The rough queue position of a queued job and its model's recent completion rate."""
        keys, levels = self._placement_keys(record.model, record.priority)
        async with self._guarded("read"):
            waiting, done, active = await self._scripts["place"](
                keys=list(keys), args=[levels, record.seq or ""]
            )
        return self._placement(int(waiting), int(done), int(active))

    async def reserve_key(self, owner: str, key: str, fingerprint: str, job_id: str) -> KeyClaim:
        async with self._guarded("reserve an idempotency key in"):
            outcome, stored_id, code = await self._scripts["reserve"](
                keys=[self._key_key(owner, key)], args=[fingerprint, job_id, KEY_LEASE_S]
            )
        return KeyClaim(str(outcome), str(stored_id), int(code or 0))

    # Each of these acts only while the key still holds `job_id` (its reservation's fencing
    # token): a request that outlived its lease must not end another request's reservation.

    async def complete_key(
        self, owner: str, key: str, job_id: str, status_code: int, ttl_s: int | None = None
    ) -> bool:
        """The key's promise kept for `ttl_s` (default RESULT_TTL_S; `ttl_for(job)` for a job)."""
        return await self._fenced_key(owner, key, job_id, "done", status_code, ttl_s or self._ttl_s)

    async def keep_key_uncertain(self, owner: str, key: str, job_id: str, ttl_s: int) -> bool:
        """The key's job may be queued (its publish was not confirmed): a retry with the key
        sends the same job id again rather than a new job."""
        return await self._fenced_key(owner, key, job_id, "uncertain", 0, ttl_s)

    async def release_key(self, owner: str, key: str, job_id: str) -> bool:
        """Nothing was accepted under the key: it is free again."""
        return await self._fenced_key(owner, key, job_id, "", 0, 0)

    async def _fenced_key(
        self, owner: str, key: str, job_id: str, state: str, status_code: int, ttl_s: int
    ) -> bool:
        async with self._guarded("update an idempotency key in"):
            done = await self._scripts["fenced_key"](
                keys=[self._key_key(owner, key)], args=[job_id, state, status_code, ttl_s]
            )
        return bool(done)

    def _key_key(self, owner: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{self._prefix}idem:{owner}:{digest}"

    async def finished_jobs(self, subscribed: asyncio.Event) -> AsyncIterator[str | None]:
        """The ids of jobs as they end, from one subscription (`subscribed` is set once it
        is in place), and None after each quiet QUIET_TICK_S; ends when the connection
        drops, raising RecordsUnavailable, so the owner resubscribes."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with self._guarded("subscribe to"):
                await pubsub.subscribe(self.finished_channel)
            subscribed.set()
            while True:
                try:
                    message = await pubsub.get_message(timeout=QUIET_TICK_S)
                except _ERRORS as exc:
                    raise RecordsUnavailable(
                        f"lost the subscription at {self._display_url}: {exc!r}"
                    ) from exc
                yield None if message is None else str(message["data"])
        finally:
            with contextlib.suppress(*_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8

    @contextlib.asynccontextmanager
    async def _guarded(self, action: str) -> AsyncIterator[None]:
        """Redis errors become RecordsUnavailable; after one, calls are skipped for a while."""
        if not self._breaker.allow():
            raise RecordsUnavailable(
                f"skipped: Redis at {self._display_url} failed less than {RECORDS_RETRY_S:.0f} s ago",
                skipped=True,
            )
        try:
            yield
        except _ERRORS as exc:
            self._breaker.record_failure()
            raise RecordsUnavailable(
                f"cannot {action} the job records at {self._display_url}: {exc!r}"
            ) from exc
        self._breaker.record_success()

    async def delete_all(self) -> None:
        """Delete every key under this prefix (benchmarks, teardown)."""
        async with self._guarded("delete keys in"):
            keys = [key async for key in self._redis.scan_iter(match=f"{self._prefix}*")]
            if keys:
                await self._redis.delete(*keys)

    async def close(self) -> None:
        await self._redis.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


def _flat(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


@functools.lru_cache(maxsize=256)
def _placement_keys(prefix: str, model: str, priority: str, bucket: int) -> tuple[tuple[str, ...], int]:
    """Cached: the same dozen names for every job of a model and priority in a 10 s bucket."""
    own = AMQP_PRIORITY.get(priority, 0)
    higher = [p for p, level in sorted(AMQP_PRIORITY.items(), key=lambda i: -i[1]) if level > own]
    lower = [p for p, level in AMQP_PRIORITY.items() if level < own]
    levels = [priority, *higher, *lower]
    counters = [
        _counter_key(prefix, kind, model, level) for level in levels for kind in ("submitted", "started")
    ]
    buckets = [_rate_key(prefix, model, bucket - i) for i in range(RATE_WINDOW_BUCKETS)]
    return (*counters, *buckets), 1 + len(higher)


def _counter_key(prefix: str, kind: str, model: str, priority: str) -> str:
    """Jobs `submitted` or `started` (or canceled) of a model at a priority."""
    return f"{prefix}{kind}:{model}:{priority}"


def _rate_key(prefix: str, model: str, bucket: int) -> str:
    """Completions of a model in one RATE_BUCKET_S bucket."""
    return f"{prefix}done:{model}:{bucket}"


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _started_from(result: Sequence[str]) -> Started:
    status, delivery, finished_ms, attempts, output, error = (str(value) for value in result)
    return Started(
        status,
        delivery,
        int(finished_ms),
        int(attempts),
        msgspec.json.decode(output) if output else None,
        error or None,
    )


def _int_or_none(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


_NO_FACTS = JobFacts("", "normal", "", 0, None, {})


def _record_from(job_id: str, fields: Mapping[str, str]) -> JobRecord:
    output, output_ref = fields.get("output"), fields.get("output_ref")
    facts = msgspec.json.decode(fields["job"], type=JobFacts) if "job" in fields else _NO_FACTS
    return JobRecord(
        id=job_id,
        status=fields["status"],
        model=facts.model,
        priority=facts.priority,
        owner=facts.owner,
        attempts=int(fields.get("attempts", 0)),
        created_ms=facts.created_ms or None,
        started_ms=_int_or_none(fields.get("started_ms")),
        finished_ms=_int_or_none(fields.get("finished_ms")),
        callback_url=facts.callback_url,
        delivery=fields.get("delivery", "none"),
        delivery_attempts=int(fields.get("delivery_attempts", 0)),
        metadata=facts.metadata,
        input_ref=facts.input_ref,
        output=None if output is None else msgspec.json.decode(output),
        output_omitted_bytes=_int_or_none(fields.get("output_omitted_bytes")),
        output_ref=None if output_ref is None else msgspec.json.decode(output_ref, type=OutputRef),
        canceled_sent=fields.get("canceled_sent") == "1",
        error=fields.get("error"),
        seq=_int_or_none(fields.get("seq")),
    )
