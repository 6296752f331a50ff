"""The callback stage: delivers finished jobs' events, separate from inference.

A worker only publishes its jobs' events to the callbacks queue and acks the jobs, so a
slow or dead receiver never holds a model replica and never makes the model run again.
A message carries one `CallbackDelivery` or, from a worker's batch, a `CallbackBatch` of
one host's events (a message per job cost the broker and both processes more than the
delivery itself). Each event gets its own outcome, and the message is settled once, when
every event's outcome is durable: one attempt per event; a retryable failure goes to the
delay tier of its next attempt as a message of its own (TTL + dead-letter back to the
callbacks queue), so nothing is held while it waits. After the last attempt, or on a
permanent failure (410 Gone, other 4xx, a URL the guard refuses), the event goes to the
callbacks parking lot, on its own, with the reason. A message that comes back (the
dispatcher died before its ack, or a publish was refused) runs all its events again:
at-least-once, with the same webhook-ids.

Back-pressure per host waits instead of re-queueing: `HostSlots` bounds deliveries in
flight per host (`CALLBACK_HOST_CONCURRENCY`) and in all (`CALLBACK_CONCURRENCY`); a
delivery for a busy host waits in memory for a slot, hosts take turns, and the broker
keeps what is beyond the prefetch (`CALLBACK_PREFETCH` messages). Only two things send
an event back to a delay tier without spending an attempt: its host's breaker is open
(it waits out the cool-down there), or its host already holds half the prefetch window
in messages (a slow host must not take the window the other hosts need).

Each delivery's state goes to the job's record (`delivery_log`). An event without a
callback URL is there only because the worker could not write the job's record: the
dispatcher writes it, and while Redis is away the event waits in a delay tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from broker.client import Broker, BrokerError, Delivery
from broker.settlement import settle
from callbacks.client import CallbackClient, DeliveryResult
from callbacks.delivery_log import DeliveryLog
from callbacks.delivery_metrics import CALLBACK_SERIES, DeliveryMetrics
from callbacks.express_lane import IDLE_DELIVERIES, LEASE_MARGIN_S, ExpressLane
from callbacks.host_slots import HostSlots
from callbacks.settings import CallbackSettings
from callbacks.signing import WebhookSigner
from job_records.store import JobRecords, RecordsUnavailable
from metrics.series import PrometheusSink
from policies.callback_guard import Resolver, SystemResolver
from policies.circuit_breaker import CircuitBreaker
from policies.prefetch_bytes import PrefetchBytes
from wire.callback_events import callback_host
from wire.envelope import (
    ATTEMPT_HEADER,
    CALLBACK_BATCH_TYPE,
    EXPRESS_HEADER,
    PARK_REASON_HEADER,
    CallbackDelivery,
    Job,
    OutputRef,
    UndecodableMessage,
    decode_callback_deliveries,
    encode,
)
from wire.outgoing import OutgoingMessage, Publish

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# How many times a delivery went back to a delay tier without an attempt.
DEFERRALS_HEADER = "x-deferrals"


# Per message, the remembered largest body shrinks by this factor unless a larger one comes.
LARGE_BODY_DECAY = 0.99


class CallbackDispatcher:
    def __init__(
        self,
        settings: CallbackSettings,
        resolve: Resolver | None = None,
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics if metrics is not None else DeliveryMetrics(PrometheusSink(CALLBACK_SERIES))
        self._topology = settings.topology
        self._schedule = settings.topology.callback_retries
        self._broker = Broker(settings.amqp_url, settings.topology, settings.models, role="callbacks")
        # The guard's lookups run on threads of their own, each with a deadline.
        self._own_resolver = SystemResolver(timeout_s=settings.dns_timeout_s)
        self._client = CallbackClient(
            WebhookSigner(settings.webhook_secret),
            settings.callback_allow,
            settings.callback_timeout_s,
            max_connections=settings.callback_concurrency,
            max_connections_per_host=settings.callback_host_concurrency,
            resolve=resolve or self._own_resolver,
        )
        self.slots = HostSlots(
            settings.callback_concurrency,
            settings.callback_host_concurrency,
            max(settings.callback_host_concurrency, settings.callback_prefetch // 2),
            settings.callback_host_hold_max_bytes,
        )
        self._prefetch_bytes = PrefetchBytes(settings.callback_prefetch_max_bytes, LARGE_BODY_DECAY)
        self._prefetch = settings.callback_prefetch
        self._prefetch_change: asyncio.Task[None] | None = None
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
        self._delivery_log = DeliveryLog(self._records)
        self._tasks: set[asyncio.Task[None]] = set()
        self.express = (
            ExpressLane(
                self._records,
                self._lane_attempt,
                busy=lambda: len(self._tasks) >= IDLE_DELIVERIES,
                spawn=self._spawn,
                delivered=lambda job_id: self._delivery_log.note(job_id, "delivered", 1),
                count=self.metrics.expressed,
                lease_s=settings.callback_timeout_s + LEASE_MARGIN_S,
            )
            if self._records is not None and settings.callback_express
            else None
        )
        self._express_task: asyncio.Task[None] | None = None
        self._consumer_tag: str | None = None
        # Only hosts with failures in their recent past have a breaker here; a closed
        # breaker with no failures is dropped, so the map does not grow with every host.
        self._breakers: dict[str, CircuitBreaker] = {}
        self._breakers_swept_at = time.monotonic()
        # Deliveries sent back to a delay tier without an attempt (breaker open, host over its share).
        self.deferrals = 0

    @property
    def is_ready(self) -> bool:
        """Connected to the broker. Not liveness: a broker outage heals by reconnecting."""
        return self._broker.is_ready

    @property
    def breaker_hosts(self) -> int:
        """Hosts that have a breaker now (those with failures in their recent past)."""
        return len(self._breakers)

    def breaker_for(self, host: str) -> CircuitBreaker:
        if host not in self._breakers:
            self._breakers[host] = CircuitBreaker(
                self._settings.callback_breaker_threshold, self._settings.callback_breaker_cooldown_s
            )
        return self._breakers[host]

    async def start(self) -> None:
        await self._broker.connect()
        self._consumer_tag = await self._broker.consume(
            self._topology.callbacks_queue,
            self._settings.callback_prefetch,
            self._on_delivery,
            replicated=self._topology.replicated,
        )
        if self.express is not None:
            self._express_task = asyncio.create_task(self.express.run(), name="express-lane")

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking deliveries, finish those under way (bounded), give the rest back."""
        timeout_s = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._consumer_tag is not None:
            await self._broker.cancel(self._consumer_tag)
        if self._express_task is not None:
            self._express_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._express_task
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._broker.close()
        await self._client.close()
        self._own_resolver.close()
        await self._delivery_log.close()
        if self._records is not None:
            await self._records.close()

    async def _on_delivery(self, delivery: Delivery) -> None:
        self._spawn(self._handle(delivery))
        self._bound_prefetch_by_bytes(len(delivery.body))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """A delivery's work, as a task that `stop` lets finish."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bound_prefetch_by_bytes(self, body_bytes: int) -> None:
        """Messages held unsettled are bounded by CALLBACK_PREFETCH_MAX_BYTES of the large
        bodies lately seen, not only by CALLBACK_PREFETCH messages (classic queues: a
        quorum consumer's prefetch is fixed, and the per-host byte hold bounds it there)."""
        self._prefetch_bytes.observe(body_bytes)
        wanted = self._prefetch_bytes.bound(self._settings.callback_prefetch)
        changing = self._prefetch_change is not None and not self._prefetch_change.done()
        if self._topology.replicated or changing or self._consumer_tag is None:
            return
        if wanted < self._prefetch or wanted >= 2 * self._prefetch:
            self._prefetch = wanted
            self._prefetch_change = asyncio.create_task(self._set_prefetch(self._consumer_tag, wanted))

    async def _set_prefetch(self, consumer_tag: str, prefetch: int) -> None:
        try:
            await self._broker.set_prefetch(consumer_tag, prefetch)
        except BrokerError as exc:
            logger.warning("callbacks prefetch not changed to %d: %s", prefetch, exc)

    async def _handle(self, delivery: Delivery) -> None:
        """Every delivery ends settled: an error nobody expected parks it with its reason.

        Under a resource alarm nothing it leads to could be published (a retry, a parked
        event): it waits until the broker reads publishes again, as the worker does, rather
        than sending the callback, failing to settle, and sending it again on every lap."""
        await self._broker.wait_until_publishable()
        try:
            await self._dispatch(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("callback %s failed unexpectedly; parking it", delivery.message_id)
            await self._park_whole(delivery, f"unexpected error in the dispatcher: {exc!r}")

    async def _dispatch(self, delivery: Delivery) -> None:
        """Each event of the message gets its outcome; then one settle for the message."""
        try:
            callbacks = decode_callback_deliveries(delivery.body, delivery.type, payloads_as_bytes=True)
        except UndecodableMessage as exc:
            await self._park_whole(delivery, str(exc))
            return
        events = _Event.of(delivery, callbacks)
        by_host: dict[str, list[_Event]] = {}
        for event in events:
            by_host.setdefault(callback_host(event.callback.callback_url or ""), []).append(event)
        size = len(delivery.body)
        grouped = await _gathered([self._host_outcomes(host, group, size) for host, group in by_host.items()])
        outcomes = [outcome for group in grouped for outcome in group]
        settled = await settle(self._broker, [(delivery, [p for o in outcomes for p in o.publishes])])
        if not settled.acked:
            return  # back in the queue: its events run again
        for event, outcome in zip([e for group in by_host.values() for e in group], outcomes, strict=True):
            if outcome.state is not None:
                self._delivery_log.note(event.callback.event.data.id, outcome.state, event.attempt)
            if outcome.state == "parked":
                self.metrics.parked()

    async def _host_outcomes(self, host: str, events: list[_Event], size_bytes: int) -> list[_Outcome]:
        """The events of one message for one host, under one hold of the host's share."""
        if not self.slots.try_hold(host, size_bytes):
            return [self._deferred(event, self._first_tier_s, "host_busy") for event in events]
        try:
            return await _gathered([self._event_outcome(host, event) for event in events])
        finally:
            self.slots.unhold(host, size_bytes)
            self._forget_breaker_if_idle(host)

    async def _event_outcome(self, host: str, event: _Event) -> _Outcome:
        """One event's outcome; an error nobody expected parks the event with its reason."""
        try:
            return await self._outcome(host, event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("callback %s failed unexpectedly; parking it", event.message_id)
            return self._parked_outcome(event, f"unexpected error in the dispatcher: {exc!r}")

    async def _outcome(self, host: str, event: _Event) -> _Outcome:
        callback = event.callback
        unrecorded: list[Publish] = []
        if callback.job is not None:  # the worker could not write the job's ending: write it here
            recorded = await self._record_ending(callback, callback.job)
            if recorded is not None and recorded != callback.event.data.status:
                # Another ending won (a cancel, or a copy of the job that ended first): only
                # the recorded ending is ever sent.
                logger.info(
                    "job %s is %s already; its %s is not sent",
                    callback.job.id,
                    recorded,
                    callback.event.type,
                )
                return _Outcome([])
            if callback.callback_url is None:
                if recorded is not None:
                    return _Outcome([])
                return self._deferred(event, self._first_tier_s, "records_unavailable")
            unrecorded = [] if recorded is not None else [self._record_only_copy(event)]
        if callback.callback_url is None:
            return self._parked_outcome(event, "no callback URL and no job to record")
        if self.express is not None and event.attempt == 1 and event.headers.get(EXPRESS_HEADER):
            verdict = await self.express.verdict(callback.event.data.id, event.body())
            if verdict is not None:
                # The lane attempted it: delivered (and noted), or its failure is this attempt's.
                return _Outcome([]) if verdict.delivered else self._outcome_of(host, event, verdict, [])
        return await self._attempt(host, event, unrecorded)

    async def _attempt(self, host: str, event: _Event, unrecorded: list[Publish]) -> _Outcome:
        """One attempt; `unrecorded` (the ending still to record) goes out with a final outcome."""
        return self._outcome_of(host, event, await self._attempted(host, event.callback), unrecorded)

    async def _attempted(self, host: str, callback: CallbackDelivery) -> DeliveryResult | None:
        """One attempt, counted on the host's breaker and in the metrics; None while the
        breaker is open (not attempted)."""
        await self.slots.acquire(host)
        started = time.monotonic()
        try:
            breaker = self.breaker_for(host)
            result = await self._client.deliver(callback) if breaker.allow() else None
        finally:
            self.slots.release(host)
        if result is None:
            return None
        outcome = "delivered" if result.delivered else "retry" if result.retryable else "refused"
        self.metrics.attempted(outcome, time.monotonic() - started)
        if result.retryable:
            breaker.record_failure()
        else:
            breaker.record_success()  # delivered, or the host answered and refused the request
        return result

    async def _lane_attempt(self, callback: CallbackDelivery) -> DeliveryResult | None:
        """The express lane's attempt, under the host's share as a consumed message's would
        be; None (not attempted) when the host holds its share or its breaker is open."""
        host = callback_host(callback.callback_url or "")
        if not self.slots.try_hold(host):
            return None
        try:
            return await self._attempted(host, callback)
        finally:
            self.slots.unhold(host)
            self._forget_breaker_if_idle(host)

    def _outcome_of(
        self, host: str, event: _Event, result: DeliveryResult | None, unrecorded: list[Publish]
    ) -> _Outcome:
        """What an attempt's result (None: not attempted) makes of the event."""
        if result is None:
            return self._deferred(event, self.breaker_for(host).remaining_cooldown_s(), "breaker_open")
        if result.delivered:
            return _Outcome(unrecorded, state="delivered")
        if result.retryable:
            return self._retry_or_park(event, result, unrecorded)
        logger.warning("callback %s refused for good: %s", event.message_id, result.error)
        return self._parked_outcome(event, result.error or "refused", unrecorded)

    async def _record_ending(self, callback: CallbackDelivery, job: Job) -> str | None:
        """Claim the job's ending in its record; the ending recorded now (this one, or one
        that won before it), or None while Redis is away."""
        data = callback.event.data
        if self._records is None:
            return data.status  # nowhere to record it: deliver as before
        try:
            output = (
                data.output
                if data.output_url is None
                else OutputRef(
                    url=data.output_url, size=data.output_size or 0, sha256=data.output_sha256 or ""
                )
            )
            recorded = await self._records.finish([(job, data.status, data.attempts, output, data.error)])
        except RecordsUnavailable as exc:
            if not exc.skipped:
                logger.warning("job %s: ending not recorded yet: %s", job.id, exc)
            return None
        return recorded.get(job.id, data.status)

    def _record_only_copy(self, event: _Event) -> Publish:
        """The event without its URL: it comes back from a delay tier only to be recorded."""
        delay_s = self._first_tier_s
        message = OutgoingMessage(
            encode(msgspec.structs.replace(event.callback, callback_url=None)),
            message_id=event.message_id,
            headers={ATTEMPT_HEADER: 1},
            expiration_ms=self._schedule.jittered_ms(delay_s),
        )
        return self._callback_outcome(message, self._topology.callback_retry_queue(delay_s))

    def _forget_breaker_if_idle(self, host: str) -> None:
        """Only hosts with failures in their recent past keep a breaker here: a closed one
        without failures, or whose last failure is a cool-down old, is dropped once nothing
        holds its host; every cool-down the whole map is swept the same way, so hosts that
        failed once and never came back do not make it grow."""
        now = time.monotonic()
        sweep = now - self._breakers_swept_at > self._settings.callback_breaker_cooldown_s
        if sweep:
            self._breakers_swept_at = now
        for candidate in list(self._breakers) if sweep else [host]:
            breaker = self._breakers.get(candidate)
            if breaker is not None and breaker.stale() and self.slots.held(candidate) == 0:
                del self._breakers[candidate]

    def _retry_or_park(self, event: _Event, result: DeliveryResult, unrecorded: list[Publish]) -> _Outcome:
        delay_s = self._schedule.delay_after(event.attempt)
        if delay_s is None:
            logger.warning(
                "callback %s given up after %d attempts: %s", event.message_id, event.attempt, result.error
            )
            return self._parked_outcome(
                event, f"gave up after {event.attempt} attempts: {result.error}", unrecorded
            )
        if result.retry_after_s is not None:
            delay_s = max(delay_s, self._tier_at_least(result.retry_after_s))
        logger.info(
            "callback %s attempt %d failed (%s); next in %.1f s",
            event.message_id,
            event.attempt,
            result.error,
            delay_s,
        )
        return _Outcome([self._republished(event, event.attempt + 1, delay_s)], state="pending")

    @property
    def _first_tier_s(self) -> float:
        return self._schedule.distinct_delays_s()[0]

    def _tier_at_least(self, wait_s: float) -> float:
        """The shortest delay tier that waits at least `wait_s` (else the longest)."""
        delays = self._schedule.distinct_delays_s()
        return min((d for d in delays if d >= wait_s), default=delays[-1])

    def _deferred(self, event: _Event, wait_s: float, reason: str) -> _Outcome:
        """Wait in a delay tier without spending an attempt (breaker open, host over its
        share, records away), at most CALLBACK_MAX_DEFERRALS times: a host that stays
        unusable for that long gets its callbacks parked (replayable), not churned through
        the tiers forever."""
        deferred = int(event.headers.get(DEFERRALS_HEADER, 0))
        if deferred >= self._settings.callback_max_deferrals:
            logger.warning("callback %s parked after %d deferrals", event.message_id, deferred)
            return self._parked_outcome(
                event, f"deferred {deferred} times (its host's breaker open or host saturated)"
            )
        self.deferrals += 1
        self.metrics.deferred(reason)
        delay_s = self._tier_at_least(wait_s)
        return _Outcome([self._republished(event, event.attempt, delay_s, {DEFERRALS_HEADER: deferred + 1})])

    def _republished(
        self, event: _Event, attempt: int, delay_s: float, extra_headers: dict[str, int] | None = None
    ) -> Publish:
        message = OutgoingMessage(
            event.body(),
            message_id=event.message_id,
            headers={**event.headers, ATTEMPT_HEADER: attempt, **(extra_headers or {})},
            expiration_ms=self._schedule.jittered_ms(delay_s),
        )
        return self._callback_outcome(message, self._topology.callback_retry_queue(delay_s))

    def _parked_outcome(self, event: _Event, reason: str, also: list[Publish] | None = None) -> _Outcome:
        return _Outcome([self._parked(event, reason), *(also or [])], state="parked")

    def _parked(self, event: _Event, reason: str) -> Publish:
        return self._parking(event.body(), event.message_id, event.headers, event.message_type, reason)

    async def _park_whole(self, delivery: Delivery, reason: str) -> None:
        """Park the message as it came (a batch stays one, and replays as one)."""
        park = self._parking(
            delivery.body, delivery.message_id or "unknown", delivery.headers, delivery.type, reason
        )
        await settle(self._broker, [(delivery, [park])])
        self.metrics.parked()

    def _parking(
        self, body: bytes, message_id: str, headers: Mapping[str, Any], message_type: str | None, reason: str
    ) -> Publish:
        message = OutgoingMessage(
            body,
            message_id=message_id,
            headers={**headers, PARK_REASON_HEADER: reason[:1000]},
            type=message_type,
        )
        return self._callback_outcome(message, self._topology.callbacks_parking_queue)

    def _callback_outcome(self, message: OutgoingMessage, queue: str) -> Publish:
        """To `queue` through the dispatcher's own exchange (never the default one)."""
        return Publish(message, queue, exchange=self._topology.callback_outcomes_exchange)


async def _gathered(awaitables: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """`asyncio.gather`, without a task for a lone coroutine: most messages carry one
    event, or one host's events."""
    if len(awaitables) == 1:
        return [await awaitables[0]]
    return list(await asyncio.gather(*awaitables))


@dataclass(frozen=True)
class _Outcome:
    """What one event comes to: the messages its message's settle publishes, and (once
    settled) the delivery state to note (pending, delivered, parked)."""

    publishes: list[Publish]
    state: str | None = None


@dataclass(frozen=True)
class _Event:
    """One event of a consumed message, with what a copy of it on its own carries."""

    callback: CallbackDelivery
    message_id: str
    headers: Mapping[str, Any]
    attempt: int
    # The event's own body when the message was just this event; else encoded on demand.
    raw: bytes | None = None
    message_type: str | None = None

    @classmethod
    def of(cls, delivery: Delivery, callbacks: list[CallbackDelivery]) -> list[_Event]:
        if delivery.type != CALLBACK_BATCH_TYPE:
            attempt = int(delivery.headers.get(ATTEMPT_HEADER, 1))
            message_id = delivery.message_id or callbacks[0].webhook_id
            return [cls(callbacks[0], message_id, delivery.headers, attempt, delivery.body, delivery.type)]
        # A batch is every event's first attempt: its retries go out one event per message.
        return [cls(c, c.webhook_id, {ATTEMPT_HEADER: 1}, 1, None, c.event.type) for c in callbacks]

    def body(self) -> bytes:
        return self.raw if self.raw is not None else encode(self.callback)
