"""One model's job loop: consume, batch, infer, and hand each outcome on durably.

Ack ordering is the guarantee: a job is acked only after every message its outcome
needs (see `outcomes`) is confirmed by the broker. A crash anywhere before that leaves
the job unacked and the broker gives it to another consumer (at-least-once; a
duplicate callback carries the same webhook-id). Nothing is ever nack-requeued in a
loop: transient failures wait in a delay tier, permanent ones are parked.

A circuit breaker watches the batches: when the model keeps failing, the replica
stops consuming (its prefetched jobs go back to the queue, their attempts unburned)
and after the cool-down lets one single-job probe batch through.

Batch size is adaptive (`batch_controller`): after each batch the controller sees its
model time and whether prefetched work is waiting, and sets the next size and wait;
the consumer's prefetch follows at twice the size.

At a backlog the model does not wait on the broker: a batch's outcomes are settled
(`broker.settlement`: pipelined publishes, one confirm wait, then one `basic.ack
multiple` where the tags allow it) while the next batch already runs; at most one batch
settles at a time. The batch's callback events for one host go out as one message
(`combine_callbacks`), after the retries and parked jobs, so each job is still acked
only once the message carrying its event is confirmed.
A delivery whose channel closed before it ran (a reconnect: the broker has already
handed it to another consumer) is dropped, not run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from broker.client import Broker, BrokerError, ChunkPart, Delivery, chunk_parts
from broker.settlement import Outcome, Settled, settle
from job_records.store import (
    EXPRESS_EVENT_MAX_BYTES,
    Ending,
    ExpressOffer,
    JobRecords,
    RecordsUnavailable,
    Started,
)
from metrics.series import PrometheusSink
from object_store.store import StoreUnavailable
from policies.circuit_breaker import BreakerState, CircuitBreaker
from policies.prefetch_bytes import PrefetchBytes
from ray_workers.batch_controller import AdaptiveBatchController, FixedBatchSize
from ray_workers.batching import collect_batch
from ray_workers.json_lines import JsonLinesJobs
from ray_workers.models.base import UNENCODABLE, InvalidInput, Model, ModelError, predictions
from ray_workers.outcomes import handed_back, parked, retry_for
from ray_workers.payload_references import PayloadReferences
from ray_workers.priority_inbox import PriorityInbox
from ray_workers.settings import WorkerSettings
from ray_workers.worker_metrics import SERIES, WorkerMetrics
from wire.callback_events import (
    callback_for,
    canceled_callback,
    carrying_job,
    combine_callbacks,
    expressed,
)
from wire.envelope import (
    ATTEMPT_HEADER,
    Job,
    JobStatus,
    JobTimings,
    OutputRef,
    UndecodableMessage,
    decode_job,
)
from wire.job_chunk import CHUNK_JOBS
from wire.job_message import input_bytes
from wire.outgoing import Publish

logger = logging.getLogger(__name__)

EXPIRED_ERROR = "deadline passed before the job ran"

RUNNING = Started("running")


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The delivery's attempt (x-attempt, 1 when absent); UndecodableMessage when it is not a
    positive integer."""
    attempt = headers.get(ATTEMPT_HEADER, 1)
    if isinstance(attempt, str) and attempt.isascii() and attempt.isdigit() and len(attempt) < 10:
        attempt = int(attempt)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise UndecodableMessage(f"header {ATTEMPT_HEADER}={str(attempt)[:40]!r} is not a positive integer")
    return attempt


@dataclass(eq=False)
class _Work:
    """One decoded job of a batch and, once known, its outcome (the same job only as itself)."""

    delivery: Delivery
    job: Job
    attempt: int
    prepared: Any = None
    output: Any = None
    error: str | None = None
    permanent: bool = False
    expired: bool = False
    # Its input is an upload or a URL, read before the batch runs (ray_workers.payload_references).
    referenced: bool = False
    # Its input is JSON Lines, streamed through the model record by record (ray_workers.json_lines).
    lines: bool = False
    # Its output, stored by reference instead of travelling inline.
    output_ref: OutputRef | None = None


# A failed batch this small whose halves both fail is searched half by half for its failing
# inputs; a larger one is the model's failure (see `_isolate`).
ISOLATE_EACH_MAX_ITEMS = 16
# Per batch, the remembered largest body shrinks by this factor unless a batch brings a larger one.
LARGE_BODY_DECAY = 0.9


def _chunk_prefetch(prefetch: int) -> int:
    """A chunk consumer's prefetch: as many jobs as a job queue's, in whole chunks."""
    return max(1, math.ceil(prefetch / CHUNK_JOBS))


def _body_bytes(delivery: Delivery) -> int:
    return len(delivery.body)


def _held_bytes(delivery: Delivery) -> int:
    """What a job holds in a batch: its body, and the input it names once read (an upload,
    a fetched URL), so a batch of references stays within WORKER_BATCH_MAX_BYTES too."""
    return len(delivery.body) + input_bytes(delivery.headers)


class JobWorker:
    """Owns its broker connection, its breaker and the batch loop for one model."""

    def __init__(
        self,
        model: Model,
        settings: WorkerSettings,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._model = model
        self._settings = settings
        # Every queue of the model (its lanes, its priorities, their chunks) has a consumer:
        # they share the budget.
        queues = len(settings.topology.job_queues(model.name)) + len(
            settings.topology.chunk_queues(model.name)
        )
        self._prefetch_bytes = PrefetchBytes(settings.prefetch_max_bytes // queues, LARGE_BODY_DECAY)
        self._topology = settings.topology
        self._schedule = settings.topology.job_retry_schedule(model.name)
        self._wall_clock = wall_clock
        self._records = (
            JobRecords(
                settings.redis_url,
                settings.topology.prefix,
                settings.result_ttl_s,
                max_output_bytes=settings.record_output_max_bytes,
            )
            if settings.redis_url
            else None
        )
        self._broker = Broker(
            settings.amqp_url, settings.topology, settings.models, role=f"worker-{model.name}"
        )
        self._inbox: asyncio.Queue[Delivery] = PriorityInbox()
        # One consumer per queue of the model: each lane, and on the quorum topology each priority.
        self._consumer_tags: list[str] = []
        # Those of them that consume chunks (`wire.job_chunk`): their prefetch is in chunks.
        self._chunk_consumer_tags: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._settling: asyncio.Task[Settled] | None = None
        self._stopping = False
        self._resume_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.breaker = CircuitBreaker(
            settings.breaker_failure_threshold, settings.breaker_cooldown_s, monotonic
        )
        rules = settings.batching_for(model.name)
        batching = AdaptiveBatchController if rules.adaptive else FixedBatchSize
        self.batching = batching(
            latency_target_s=rules.latency_target_s,
            max_size=rules.max_size,
            size=1 if rules.adaptive else rules.max_size,
            max_wait_s=rules.max_wait_s,
        )
        self.metrics = metrics if metrics is not None else WorkerMetrics(PrometheusSink(SERIES))
        self._payloads = PayloadReferences(model.name, settings)
        self._json_lines = JsonLinesJobs(model, self._payloads, rules.max_size, settings.batch_max_bytes)
        # The model's time on its last batch: under QUICK_BATCH_MS the next one is quick
        # (`_is_quick`). None run yet: not quick, as for a slow model.
        self._last_model_s = math.inf

    @property
    def is_alive(self) -> bool:
        """Liveness: the job loop runs. A broker outage does not end it (the connection
        reconnects), so it must not make Serve restart the replica and reload the model."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def is_ready(self) -> bool:
        """Readiness: alive and connected to the broker."""
        return self.is_alive and self._broker.is_ready

    @property
    def is_consuming(self) -> bool:
        return bool(self._consumer_tags)

    async def start(self) -> None:
        # From the start, not only after a first change: the dashboard's breaker panel and
        # the breaker alert read this series (the cluster rehearsal found it empty).
        self.metrics.set_breaker_state(self._model.name, self.breaker.state.value)
        await self._payloads.__aenter__()
        await self._broker.connect()
        self._loop_task = asyncio.create_task(self._run(), name=f"job-loop-{self._model.name}")
        await self._consume(self._prefetch())
        logger.info("worker for %s consuming", self._model.name)

    def _prefetch(self) -> int:
        # Twice the batch size: a replica holds at most one batch beyond the one it runs,
        # which keeps the model busy (the inbox serves high priority first whatever came
        # in). A quorum queue's consumer keeps the prefetch it started with, so there it is
        # twice the largest batch, per priority. Bounded by bytes as well: no more than
        # PREFETCH_MAX_BYTES of the large bodies lately seen (classic queues: a quorum
        # consumer's prefetch is fixed, and its batches alone are bounded by bytes).
        by_count = 2 * (self.batching.max_size if self._topology.replicated else self.batching.size)
        return self._prefetch_bytes.bound(by_count)

    async def _consume(self, prefetch: int) -> None:
        replicated = self._topology.replicated
        for queue in self._topology.job_queues(self._model.name):
            tag = await self._broker.consume(queue, prefetch, self._inbox.put, replicated=replicated)
            self._consumer_tags.append(tag)
        for queue in self._topology.chunk_queues(self._model.name):
            chunks = _chunk_prefetch(prefetch)
            tag = await self._broker.consume(queue, chunks, self._put_chunk, replicated=replicated)
            self._consumer_tags.append(tag)
            self._chunk_consumer_tags.add(tag)

    async def _put_chunk(self, delivery: Delivery) -> None:
        """A chunk's jobs join the inbox one by one, each as if it had come alone."""
        for part in chunk_parts(delivery):
            self._inbox.put_nowait(part)

    async def _stop_consuming(self) -> None:
        """Cancel the consumers and close their channels: what they prefetched goes back."""
        if not self._consumer_tags:
            return
        if self._settling is not None:
            await asyncio.shield(self._settling)  # acks must reach the channel before it closes
        await self._hand_back_started_chunks()
        tags, self._consumer_tags = self._consumer_tags, []
        self._chunk_consumer_tags.clear()
        for tag in tags:
            await self._broker.cancel(tag, close_channel=True)
        while not self._inbox.empty():  # deliveries of the closed channels: already returned
            self._inbox.get_nowait()

    async def _hand_back_started_chunks(self) -> None:
        """Before the consumers' channels close. A chunk some of whose jobs have ended would
        come back whole, and those jobs with it, so its jobs still waiting in the inbox go
        back one by one (`outcomes.handed_back`, attempts unburned) and the chunk is acked;
        a chunk none of whose jobs ran goes back whole with its channel."""
        waiting = [self._inbox.get_nowait() for _ in range(self._inbox.qsize())]
        outcomes: list[Outcome] = []
        for delivery in waiting:
            if not (isinstance(delivery, ChunkPart) and delivery.chunk_started and delivery.channel_open):
                self._inbox.put_nowait(delivery)
                continue
            try:
                job = decode_job(delivery.body)
            except UndecodableMessage as exc:
                outcomes.append((delivery, [self._parked_as_is(delivery, str(exc))]))
                continue
            outcomes.append((delivery, [handed_back(delivery.body, job, delivery.headers, self._topology)]))
        if outcomes:
            settled = await settle(self._broker, outcomes)
            logger.info("model %s: %d jobs of started chunks handed back", self._model.name, settled.acked)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking work, let the batch in flight finish (bounded), give the rest back."""
        timeout_s = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        deadline = time.monotonic() + timeout_s
        self._stopping = True  # the loop takes no further batch from the inbox
        if self._resume_task is not None:
            self._resume_task.cancel()
        for tag in self._consumer_tags:
            await self._broker.cancel(tag)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            logger.warning(
                "drain of %s timed out after %.1f s; its batch goes back to the queue",
                self._model.name,
                timeout_s,
            )
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._settling is not None:
            await asyncio.wait([self._settling], timeout=max(0.0, deadline - time.monotonic()))
        if self._settling is None or self._settling.done():
            await self._hand_back_started_chunks()
        # Closing the channels returns every unacked message (prefetched, in the inbox
        # or in an abandoned batch) to the queue.
        await self._broker.close()
        await self._payloads.__aexit__(None, None, None)
        if self._records is not None:
            await self._records.close()

    async def _run(self) -> None:
        while not self._stopping:
            # Under a resource alarm no outcome could be published: run nothing until it clears.
            await self._broker.wait_until_publishable()
            # A half-open breaker's probe is one job, even where each of a model's queues
            # gave the probe consumer one (the quorum topology).
            probing = self.breaker.state is BreakerState.HALF_OPEN
            size = 1 if probing else self.batching.size
            batch = await collect_batch(
                self._inbox,
                size,
                self.batching.wait_s,
                max_bytes=self._settings.batch_max_bytes,
                size_of=_held_bytes,
            )
            if self._stopping:
                # Taken during the drain: left unacked, it goes back with the channel (a
                # chunk's jobs are handed back from the inbox, `_hand_back_started_chunks`).
                for delivery in batch.items:
                    self._inbox.put_nowait(delivery)
                break
            self._idle.clear()
            try:
                inference_s, model_failed = await self._process(batch.items)
            except BrokerError:
                raise
            except Exception as exc:
                # A defect of ours or a model's must not end the loop: Serve would restart the
                # replica and the redelivered batch would end the next one too.
                logger.exception(
                    "model %s: a batch of %d failed in the worker", self._model.name, len(batch.items)
                )
                await self._park_batch(batch.items, f"the worker failed on this batch: {exc!r}")
                inference_s, model_failed = 0.0, False
            finally:
                self._idle.set()
            self.metrics.observe_batch(self._model.name, len(batch.items), batch.filled_s, inference_s)
            # Again with every batch, not only at start and on a change: under Ray a gauge set
            # while the replica starts can miss its metrics agent, and the breaker panel and
            # alert read this series (a rehearsal found it empty once in a few runs).
            self.metrics.set_breaker_state(self._model.name, self.breaker.state.value)
            self._prefetch_bytes.observe(max(_body_bytes(delivery) for delivery in batch.items))
            await self._adapt_batch_size(len(batch.items), inference_s, model_failed)

    async def _adapt_batch_size(self, batch_size: int, inference_s: float, failed: bool) -> None:
        before = self._prefetch()
        adjustment = self.batching.record(
            batch_size, inference_s, work_waiting=not self._inbox.empty(), failed=failed
        )
        self.metrics.record_adjustment(
            self._model.name, adjustment.value, self.batching.size, self.batching.wait_s
        )
        closed = self.breaker.state is BreakerState.CLOSED
        if self._prefetch() != before and closed and not self._topology.replicated:
            for tag in self._consumer_tags:
                prefetch = self._prefetch()
                if tag in self._chunk_consumer_tags:
                    prefetch = _chunk_prefetch(prefetch)
                try:
                    await self._broker.set_prefetch(tag, prefetch)
                except BrokerError as exc:
                    logger.warning("model %s: prefetch not changed: %s", self._model.name, exc)

    async def _process(self, batch: list[Delivery]) -> tuple[float, bool]:
        """Run the batch and start settling it; returns the model's time on it, in seconds,
        and whether the model failed it.

        Every delivery of the batch is settled by the settling task this starts (after the
        previous batch's), except those whose channel has closed, which are dropped. A job
        whose record says it ended or was canceled is settled without its run's ending: a
        quick batch (`_is_quick`) is marked running and ended in one round trip after the
        model ran; any other is marked running first, and such a job does not run."""
        # Whole milliseconds for the records; the timings keep the fraction, so a job's
        # queue wait (a hop of 1-2 ms at low load) is not rounded to whole milliseconds.
        taken_ms = self._wall_clock() * 1000
        now_ms = int(taken_ms)
        work, outcomes = self._decode(batch, now_ms)
        await self._read_referenced(work)
        quick = self._is_quick(work)
        fresh = (
            work if quick else self._still_running(work, await self._started(work, now_ms), outcomes, now_ms)
        )
        runnable = [item for item in fresh if item.error is None and not item.expired and not item.lines]
        streamed = [item for item in fresh if item.lines and not item.expired]
        inference_s, model_failed = await self._infer(runnable)
        large = self._large_outputs(runnable)
        if quick and large:
            # Marked running before an output is stored: a job canceled meanwhile stores nothing.
            quick = False
            fresh = self._still_running(work, await self._started(work, now_ms), outcomes, now_ms)
            running = set(fresh)
            runnable = [item for item in runnable if item in running]
            large = [(item, encoded) for item, encoded in large if item in running]
        await self._store_outputs(large)
        if streamed:
            lines_s, lines_failed = await self._run_lines(streamed)
            inference_s, model_failed = inference_s + lines_s, model_failed or lines_failed
        self._last_model_s = inference_s
        timings = [
            JobTimings(
                queued_ms=round(max(0.0, taken_ms - item.job.submitted_at_ms), 3),
                inference_ms=round(inference_s * 1000, 3),
                batch_size=len(runnable),
            )
            for item in fresh
        ]
        decided = [(item, self._outcome(item, timing)) for item, timing in zip(fresh, timings, strict=True)]
        if quick:
            outcomes.extend(await self._started_and_ended(work, decided, now_ms))
        else:
            outcomes.extend(await self._first_terminal_wins(decided))
        previous = self._settling
        if previous is not None:
            # One batch settling at a time: prefetch stays bounded. Shielded: a cancelled
            # loop (a drain that timed out) must not cancel acks of work already done.
            await asyncio.shield(previous)
        self._settling = asyncio.create_task(settle(self._broker, outcomes, combine=combine_callbacks))
        if runnable or streamed:
            await self._update_breaker(model_failed)
        return inference_s, model_failed

    def _is_quick(self, work: list[_Work]) -> bool:
        """Whether the batch is marked running after it ran, with its endings: the model's
        last batch took under QUICK_BATCH_MS, and no job streams JSON Lines. It saves a
        Redis round trip a batch; what it costs is that a job canceled or ended meanwhile
        runs (its run's ending is dropped), at most one quick batch's model time."""
        return (
            self._records is not None
            and self._last_model_s < self._settings.quick_batch_s
            and not any(item.lines for item in work)
        )

    def _still_running(
        self, work: list[_Work], started: dict[str, Started], outcomes: list[Outcome], now_ms: int
    ) -> list[_Work]:
        """The jobs marked running; each of the others gets what `_ended_before` sends."""
        running = []
        for item in work:
            start = started.get(item.job.id, RUNNING)
            if start.status == "running":
                running.append(item)
            else:
                outcomes.append((item.delivery, self._ended_before(item, start, now_ms)))
        return running

    async def _park_batch(self, batch: list[Delivery], reason: str) -> None:
        """Park every delivery of a batch the worker itself failed on (replayable, none lost),
        once the batch settling before it is done: a delivery it settled stays settled."""
        previous = self._settling
        if previous is not None:
            await asyncio.shield(previous)
        outcomes: list[Outcome] = [
            (delivery, [self._parked_as_is(delivery, reason)])
            for delivery in batch
            if delivery.channel_open and not delivery.settled
        ]
        self._settling = asyncio.create_task(settle(self._broker, outcomes))

    def _parked_as_is(self, delivery: Delivery, reason: str) -> Publish:
        """The delivery to the parking lot as it came (replayable), with its reason."""
        return parked(
            delivery.body,
            delivery.message_id or "unknown",
            delivery.headers,
            reason,
            self._model.name,
            self._topology,
        )

    def _decode(self, batch: list[Delivery], now_ms: int) -> tuple[list[_Work], list[Outcome]]:
        """The batch's jobs, prepared; undecodable bodies already have their outcome (parked)."""
        work: list[_Work] = []
        outcomes: list[Outcome] = []
        for delivery in batch:
            if not delivery.channel_open:
                logger.info("dropping %s: its channel closed, the broker redelivers it", delivery.message_id)
                continue
            try:
                job = decode_job(delivery.body)
                attempt = attempt_of(delivery.headers)
            except UndecodableMessage as exc:
                logger.warning("parking undecodable message %s: %s", delivery.message_id, exc)
                outcomes.append((delivery, [self._parked_as_is(delivery, str(exc))]))
                continue
            work.append(self._prepare(delivery, job, attempt, now_ms))
        return work, outcomes

    def _ended_before(self, item: _Work, start: Started, now_ms: int) -> list[Publish]:
        """A copy of a job that already ended (or was canceled) is not run. A finished one
        sends its recorded ending again: the copy that recorded it may have died before
        its event was confirmed, and only this redelivery can still send it (same
        webhook-id: a receiver may see it twice, never two different endings)."""
        job = item.job
        if start.status == "canceled":
            owed = start.owes_canceled_callback(now_ms) and job.callback_url
            logger.info("job %s was canceled; not run%s", job.id, ", job.canceled sent here" if owed else "")
            return [canceled_callback(job, now_ms / 1000, self._topology)] if owed else []
        logger.info("job %s already %s; its ending is sent again, the model not run", job.id, start.status)
        if not job.callback_url:
            return []
        status: JobStatus = start.status  # type: ignore[assignment]
        timings = JobTimings(queued_ms=0.0, inference_ms=0.0, batch_size=0)
        ending = callback_for(
            job, status, start.attempts, timings, now_ms / 1000, self._topology, start.output, start.error
        )
        if status != "failed":
            return [ending]
        park = parked(
            item.delivery.body,
            job.id,
            item.delivery.headers,
            "failed (sent again after a redelivery)",
            job.model,
            self._topology,
            start.attempts,
            start.error or "",
            now_ms,
        )
        return [park, ending]

    async def _started(self, work: list[_Work], now_ms: int) -> dict[str, Started]:
        """What marking each job running found; empty without the records."""
        if self._records is None or not work:
            return {}
        try:
            return await self._records.start([(item.job, item.attempt) for item in work], now_ms)
        except RecordsUnavailable as exc:
            if not exc.skipped:
                logger.warning("job records unavailable, running without the check: %s", exc)
            return {}

    async def _first_terminal_wins(self, decided: list[tuple[_Work, list[Publish]]]) -> list[Outcome]:
        """Record each terminal status; a copy whose job already ended otherwise publishes
        nothing (its delivery is only acked), so no job has two terminal events."""
        endings = self._endings(decided)
        offer = self._express_offer(decided)
        recorded = await self._finish(endings.values(), offer) if endings else None
        return self._kept_endings(self._marked_expressed(decided, offer), endings, recorded)

    async def _started_and_ended(
        self, work: list[_Work], decided: list[tuple[_Work, list[Publish]]], now_ms: int
    ) -> list[Outcome]:
        """A quick batch, already run: its jobs marked running and their endings recorded
        in one round trip. A job found canceled or ended sends what `_ended_before` says
        instead of its run's ending."""
        endings = self._endings(decided)
        offer = self._express_offer(decided)
        started: dict[str, Started] = {}
        recorded: dict[str, str] | None = None
        if self._records is not None:
            try:
                started, recorded = await self._records.start_and_finish(
                    [(item.job, item.attempt) for item in work],
                    now_ms,
                    self._ending_rows(endings.values()),
                    offer,
                )
            except RecordsUnavailable as exc:
                if not exc.skipped:
                    logger.warning("job records unavailable, running without the checks: %s", exc)
        outcomes: list[Outcome] = []
        ran = set(self._still_running([item for item, _ in decided], started, outcomes, now_ms))
        marked = self._marked_expressed(decided, offer)
        kept = [(item, publishes) for item, publishes in marked if item in ran]
        return outcomes + self._kept_endings(kept, endings, recorded)

    def _express_offer(self, decided: list[tuple[_Work, list[Publish]]]) -> ExpressOffer | None:
        """A lone job's callback event, offered to the express lane with its ending: a batch
        of one is low load, where a dispatcher waiting on the lane sends it a broker hop
        sooner. Larger batches, and large events, go by the broker alone."""
        if len(decided) != 1 or self._records is None:
            return None
        item, publishes = decided[0]
        events = [
            publish.message.body
            for publish in publishes
            if self._is_ending_event(publish) and len(publish.message.body) <= EXPRESS_EVENT_MAX_BYTES
        ]
        return ExpressOffer({item.job.id: events[0]}) if events and item.job.callback_url else None

    def _marked_expressed(
        self, decided: list[tuple[_Work, list[Publish]]], offer: ExpressOffer | None
    ) -> list[tuple[_Work, list[Publish]]]:
        """Each event the lane took, its broker copy marked so (EXPRESS_HEADER)."""
        if offer is None or not offer.pushed:
            return decided
        return [
            (
                item,
                [
                    expressed(p) if item.job.id in offer.pushed and self._is_ending_event(p) else p
                    for p in publishes
                ],
            )
            for item, publishes in decided
        ]

    def _is_ending_event(self, publish: Publish) -> bool:
        return publish.routing_key == self._topology.callbacks_queue and bool(publish.message.type)

    def _endings(self, decided: list[tuple[_Work, list[Publish]]]) -> dict[str, tuple[_Work, str]]:
        """Each job whose outcome ends it, with the status it ends with."""
        return {
            item.job.id: (item, publish.message.type.removeprefix("job."))
            for item, publishes in decided
            for publish in publishes
            if publish.routing_key == self._topology.callbacks_queue and publish.message.type
        }

    def _kept_endings(
        self,
        decided: list[tuple[_Work, list[Publish]]],
        endings: dict[str, tuple[_Work, str]],
        recorded: dict[str, str] | None,
    ) -> list[Outcome]:
        """Each job's outcome as the records allow it (None: not recorded), each ending kept
        counted once. A job without a callback URL needs its event only when its record
        could not be written."""
        outcomes: list[Outcome] = []
        for item, publishes in decided:
            own = endings[item.job.id][1] if item.job.id in endings else None
            if own is None:
                outcomes.append((item.delivery, publishes))
                continue
            if recorded is not None and recorded.get(item.job.id, own) != own:
                logger.warning(
                    "job %s already ended as %s; this copy's %s is not sent",
                    item.job.id,
                    recorded[item.job.id],
                    own,
                )
                outcomes.append((item.delivery, []))
                continue
            self.metrics.count_outcome(item.job.model, own, item.job.tenant)
            if recorded is None:
                # Not recorded: the event carries its job, and the dispatcher records it.
                carried = [self._carrying(p, item.job) for p in publishes] if self._records else publishes
                outcomes.append((item.delivery, carried))
            elif not item.job.callback_url:
                kept = [p for p in publishes if p.routing_key != self._topology.callbacks_queue]
                outcomes.append((item.delivery, kept))
            else:
                outcomes.append((item.delivery, publishes))
        return outcomes

    def _carrying(self, publish: Publish, job: Job) -> Publish:
        return (
            carrying_job(publish, job) if publish.routing_key == self._topology.callbacks_queue else publish
        )

    async def _finish(
        self, endings: Iterable[tuple[_Work, str]], express: ExpressOffer | None
    ) -> dict[str, str] | None:
        """The status each job is recorded with now; None when there are no records or
        Redis is away (at-least-once meanwhile)."""
        if self._records is None:
            return None
        try:
            return await self._records.finish(self._ending_rows(endings), express)
        except RecordsUnavailable as exc:
            if not exc.skipped:
                logger.warning("job records unavailable, publishing without the check: %s", exc)
            return None

    def _ending_rows(self, endings: Iterable[tuple[_Work, str]]) -> list[Ending]:
        """What the records keep of each ending."""
        return [
            (item.job, status, item.attempt, item.output_ref or item.output, self._ending_error(item))
            for item, status in endings
        ]

    @staticmethod
    def _ending_error(item: _Work) -> str | None:
        return EXPIRED_ERROR if item.expired else item.error

    def _prepare(self, delivery: Delivery, job: Job, attempt: int, now_ms: int) -> _Work:
        item = _Work(delivery, job, attempt)
        if job.deadline_ms is not None and now_ms > job.deadline_ms:
            item.expired = True
            return item
        if job.input_format == "jsonl":
            item.lines = True
        elif job.input_ref is not None or job.input_url is not None:
            item.referenced = True
        else:
            self._prepare_input(item, job.input)
        return item

    def _prepare_input(self, item: _Work, job_input: Any) -> None:
        try:
            item.prepared = self._model.prepare(job_input, item.attempt)
        except InvalidInput as exc:
            item.error, item.permanent = str(exc), True

    async def _read_referenced(self, work: list[_Work]) -> None:
        """Each referenced input read, checked and prepared, all at once; a miss or a store
        that did not answer becomes the job's error."""
        referenced = [item for item in work if item.referenced and not item.expired]
        reads = await asyncio.gather(*(self._payloads.read_job_input(item.job) for item in referenced))
        for item, read in zip(referenced, reads, strict=True):
            if read.error is not None:
                item.error, item.permanent = read.error, read.permanent
                continue
            # The job keeps its reference: a retry, a parked copy or a callback carrying the
            # job stays small; only the model sees the input.
            self._prepare_input(item, read.value)

    async def _run_lines(self, items: Sequence[_Work]) -> tuple[float, bool]:
        """Each JSON Lines job streamed through the model, one after another (each holds a
        batch and an output part, never its input or output); returns the seconds it took
        and whether the model failed one."""
        started = time.monotonic()
        model_failed = False
        for item in items:
            outcome = await self._json_lines.run(item.job, item.attempt)
            item.output_ref, item.error, item.permanent = outcome.output_ref, outcome.error, outcome.permanent
            model_failed = model_failed or outcome.model_failed
        return time.monotonic() - started, model_failed

    def _large_outputs(self, items: Sequence[_Work]) -> list[tuple[_Work, bytes]]:
        """The outputs over OUTPUT_INLINE_MAX_BYTES, encoded, where there is a store for them."""
        large: list[tuple[_Work, bytes]] = []
        for item in items:
            if item.error is not None or not self._payloads.stores_outputs:
                continue
            try:
                encoded = msgspec.json.encode(item.output)
            except UNENCODABLE:
                continue  # the job fails on it when its event is made
            if self._payloads.by_reference(encoded):
                large.append((item, encoded))
        return large

    async def _store_outputs(self, large: list[tuple[_Work, bytes]]) -> None:
        """Large outputs to the object store, all at once; one that cannot be stored makes
        its job retry (the model runs it again)."""
        stored = await asyncio.gather(
            *(self._payloads.store_output(item.job.id, encoded) for item, encoded in large),
            return_exceptions=True,
        )
        for (item, _), result in zip(large, stored, strict=True):
            if isinstance(result, StoreUnavailable):
                item.output, item.error = None, f"the output could not be stored: {result}"
            elif isinstance(result, BaseException):
                raise result
            else:
                item.output, item.output_ref = None, result

    async def _infer(self, runnable: Sequence[_Work]) -> tuple[float, bool]:
        """Run the model on the batch off the event loop and record each item's output or
        error; returns the seconds it took and whether the model failed (not an input)."""
        if not runnable:
            return 0.0, False
        started = time.monotonic()
        error = await self._predict_into(runnable)
        model_failed = error is not None and await self._isolate(runnable, error)
        return time.monotonic() - started, model_failed

    async def _predict_into(self, items: Sequence[_Work]) -> str | None:
        """One predict call: records the outputs and returns None, or returns the error."""
        try:
            outputs = await predictions(self._model, [w.prepared for w in items])
        except ModelError as exc:
            logger.warning("batch of %d for %s failed: %s", len(items), self._model.name, exc)
            return str(exc)
        except Exception:
            logger.exception("model %s raised unexpectedly", self._model.name)
            return "internal model error"
        for item, output in zip(items, outputs, strict=True):
            item.output = output
        return None

    async def _isolate(self, items: Sequence[_Work], error: str) -> bool:
        """A batch failed: halve it until the failing inputs are found, so the jobs batched
        with them are not charged an attempt. When both halves of more than
        ISOLATE_EACH_MAX_ITEMS fail it is the model, not an input: every item gets the error
        (at most 2 log2(n) extra predict calls). A smaller batch whose halves both fail may
        hold two failing inputs (retries bunch after an outage), so each half is isolated
        too (at most 2 x ISOLATE_EACH_MAX_ITEMS more calls). Returns whether it was the
        model: every input failed."""
        if len(items) == 1:
            items[0].error = error
            return True
        middle = len(items) // 2
        halves = (items[:middle], items[middle:])
        errors = [await self._predict_into(half) for half in halves]
        both_failed = errors[0] is not None and errors[1] is not None
        if both_failed and len(items) > ISOLATE_EACH_MAX_ITEMS:
            for half, half_error in zip(halves, errors, strict=True):
                for item in half:
                    item.error = half_error
            return True
        verdicts = [
            await self._isolate(half, half_error)
            for half, half_error in zip(halves, errors, strict=True)
            if half_error is not None
        ]
        return both_failed and all(verdicts)

    def _outcome(self, item: _Work, timings: JobTimings) -> list[Publish]:
        job, attempt = item.job, item.attempt
        now_s = self._wall_clock()
        now_ms = int(now_s * 1000)
        if item.expired:
            logger.info("job %s expired before it ran", job.id)
            return [
                callback_for(
                    job,
                    "expired",
                    attempt,
                    timings,
                    now_s,
                    self._topology,
                    error=EXPIRED_ERROR,
                )
            ]
        if item.error is None:
            try:
                succeeded = callback_for(
                    job,
                    "succeeded",
                    attempt,
                    timings,
                    now_s,
                    self._topology,
                    output=item.output,
                    output_ref=item.output_ref,
                )
            except UNENCODABLE as exc:
                item.output, item.permanent = None, True
                item.error = f"the model's output cannot be encoded as JSON: {exc!r}"[:1000]
            else:
                return [succeeded]
        delay_s = None if item.permanent else self._schedule.delay_after(attempt)
        if delay_s is not None and (job.deadline_ms is None or now_ms + delay_s * 1000 < job.deadline_ms):
            logger.info(
                "job %s attempt %d failed, retrying in %.1f s: %s", job.id, attempt, delay_s, item.error
            )
            return [
                retry_for(
                    item.delivery.body,
                    job,
                    item.delivery.headers,
                    attempt,
                    item.error,
                    delay_s,
                    self._schedule.jittered_ms(delay_s),
                    self._topology,
                    now_ms,
                )
            ]
        reason = "permanent error" if item.permanent else f"failed after {attempt} attempt(s)"
        logger.warning("job %s parked (%s): %s", job.id, reason, item.error)
        return [
            parked(
                item.delivery.body,
                job.id,
                item.delivery.headers,
                reason,
                job.model,
                self._topology,
                attempt,
                item.error,
                now_ms,
            ),
            callback_for(job, "failed", attempt, timings, now_s, self._topology, error=item.error),
        ]

    async def _update_breaker(self, failed: bool) -> None:
        before = self.breaker.state
        if failed:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        after = self.breaker.state
        if after is before:
            return
        self.metrics.set_breaker_state(self._model.name, after.value)
        logger.warning("model %s breaker %s -> %s", self._model.name, before.value, after.value)
        if after is BreakerState.OPEN:
            await self._stop_consuming()
            self._resume_task = asyncio.create_task(self._resume_after_cooldown())
        elif after is BreakerState.CLOSED and before is BreakerState.HALF_OPEN:
            try:
                await self._stop_consuming()
                await self._consume(self._prefetch())
            except BrokerError as exc:
                # Counted as a failed probe: the breaker opens again and consumes after its cooldown.
                logger.warning("model %s could not resume consuming: %s", self._model.name, exc)
                await self._update_breaker(failed=True)

    async def _resume_after_cooldown(self) -> None:
        await asyncio.sleep(self.breaker.remaining_cooldown_s())
        if self.breaker.allow():
            logger.warning("model %s breaker half-open: probing with one job", self._model.name)
            self.metrics.set_breaker_state(self._model.name, self.breaker.state.value)
            try:
                await self._consume(1)
            except BrokerError as exc:
                # Counted as a failed probe: the breaker opens again and retries later.
                logger.warning("model %s probe could not consume: %s", self._model.name, exc)
                await self._update_breaker(failed=True)
