"""The callback stage: delivers finished jobs' events, separate from inference.

A worker only publishes a `CallbackDelivery` to the callbacks queue and acks its job,
so a slow or dead receiver never holds a model replica and never makes the model run
again. The dispatcher makes one attempt per delivery; a retryable failure goes to the
delay tier of its next attempt (TTL + dead-letter back to the callbacks queue), so no
message is held while it waits. After the last attempt, or on a permanent failure
(410 Gone, other 4xx, a URL the guard refuses), the event goes to the callbacks
parking lot with the reason. Every path acks only after its publish is confirmed.

Back-pressure per host waits instead of re-queueing: `HostSlots` bounds deliveries in
flight per host (`CALLBACK_HOST_CONCURRENCY`) and in all (`CALLBACK_CONCURRENCY`); a
delivery for a busy host waits in memory for a slot, hosts take turns, and the broker
keeps what is beyond the prefetch (`CALLBACK_PREFETCH`). Only two things send a delivery
back to a delay tier without spending an attempt: its host's breaker is open (it waits
out the cool-down there), or its host already holds half the prefetch window (a slow
host must not take the window the other hosts need).

Each delivery's state goes to the job's record (`delivery_log`). An event without a
callback URL is there only because the worker could not write the job's record: the
dispatcher writes it, and while Redis is away the event waits in a delay tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import urlsplit

import msgspec

from callbacks.client import CallbackClient, DeliveryResult
from callbacks.delivery_log import DeliveryLog
from callbacks.delivery_metrics import CALLBACK_SERIES, DeliveryMetrics
from callbacks.host_slots import HostSlots
from callbacks.settings import CallbackSettings
from callbacks.signing import WebhookSigner
from contract.broker import Broker, Delivery, OutgoingMessage
from contract.callback_guard import Resolver, SystemResolver
from contract.circuit_breaker import BreakerState, CircuitBreaker
from contract.envelope import (
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    CallbackDelivery,
    Job,
    UndecodableMessage,
    decode_callback_delivery,
    encode,
)
from contract.job_records import JobRecords, RecordsUnavailable
from contract.metric_series import PrometheusSink
from contract.settlement import Publish, settle

logger = logging.getLogger(__name__)

# How many times a delivery went back to a delay tier without an attempt.
DEFERRALS_HEADER = "x-deferrals"


def host_key(callback_url: str) -> str:
    """The host a delivery's slots and breaker belong to ("" for a URL with none)."""
    try:
        return (urlsplit(callback_url).hostname or "").lower()
    except ValueError:
        return ""


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
        )
        self._records = (
            JobRecords(settings.redis_url, settings.topology.prefix, settings.result_ttl_s)
            if settings.redis_url
            else None
        )
        self._delivery_log = DeliveryLog(self._records)
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer_tag: str | None = None
        # Only hosts with failures in their recent past have a breaker here; a closed
        # breaker with no failures is dropped, so the map does not grow with every host.
        self._breakers: dict[str, CircuitBreaker] = {}
        # Deliveries sent back to a delay tier without an attempt (breaker open, host over its share).
        self.deferrals = 0

    @property
    def is_ready(self) -> bool:
        """Connected to the broker. Not liveness: a broker outage heals by reconnecting."""
        return self._broker.is_ready

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

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking deliveries, finish those under way (bounded), give the rest back."""
        timeout_s = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._consumer_tag is not None:
            await self._broker.cancel(self._consumer_tag)
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
        task = asyncio.create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, delivery: Delivery) -> None:
        """Every delivery ends settled: an error nobody expected parks it with its reason."""
        try:
            await self._dispatch(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("callback %s failed unexpectedly; parking it", delivery.message_id)
            await self._park(delivery, f"unexpected error in the dispatcher: {exc!r}")

    async def _dispatch(self, delivery: Delivery) -> None:
        try:
            callback = decode_callback_delivery(delivery.body)
        except UndecodableMessage as exc:
            await self._park(delivery, str(exc))
            return
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 1))
        unrecorded: list[Publish] = []
        if callback.job is not None:  # the worker could not write the job's ending: write it here
            recorded = await self._record_ending(callback, callback.job)
            if callback.callback_url is None:
                if recorded:
                    await settle(self._broker, [(delivery, [])])
                else:
                    await self._defer(
                        delivery, attempt, self._schedule.distinct_delays_s()[0], "records_unavailable"
                    )
                return
            unrecorded = [] if recorded else [self._record_only_copy(delivery, callback)]
        if callback.callback_url is None:
            await self._park(delivery, "no callback URL and no job to record")
            return
        await self._deliver(delivery, callback, callback.callback_url, attempt, unrecorded)

    async def _deliver(
        self,
        delivery: Delivery,
        callback: CallbackDelivery,
        url: str,
        attempt: int,
        unrecorded: list[Publish],
    ) -> None:
        """One attempt; `unrecorded` (the ending still to record) goes out with a final settle."""
        host = host_key(url)
        if not self.slots.try_hold(host):
            await self._defer(delivery, attempt, self._schedule.distinct_delays_s()[0], "host_busy")
            return
        try:
            await self.slots.acquire(host)
        except asyncio.CancelledError:
            self.slots.drop(host)
            raise
        started = time.monotonic()
        try:
            breaker = self.breaker_for(host)
            result = await self._client.deliver(callback) if breaker.allow() else None
        finally:
            self.slots.release(host)
        if result is not None:
            outcome = "delivered" if result.delivered else "retry" if result.retryable else "refused"
            self.metrics.attempted(outcome, time.monotonic() - started)
        if result is None:
            await self._defer(delivery, attempt, breaker.remaining_cooldown_s(), "breaker_open")
        elif result.delivered:
            self._record(host, breaker, ok=True)
            await settle(self._broker, [(delivery, unrecorded)])
            self._delivery_log.note(callback.event.data.id, "delivered", attempt)
        elif result.retryable:
            self._record(host, breaker, ok=False)
            await self._retry_or_park(delivery, callback, attempt, result, unrecorded)
        else:
            self._record(host, breaker, ok=True)  # the host answered; it is the request that is refused
            logger.warning("callback %s refused for good: %s", callback.webhook_id, result.error)
            await self._park(delivery, result.error or "refused", unrecorded)
            self._delivery_log.note(callback.event.data.id, "parked", attempt)

    async def _record_ending(self, callback: CallbackDelivery, job: Job) -> bool:
        """Write the job's ending to its record; False while Redis is away."""
        if self._records is None:
            return True  # nowhere to record it: deliver as before
        data = callback.event.data
        try:
            await self._records.finish([(job, data.status, data.attempts, data.output, data.error)])
        except RecordsUnavailable as exc:
            if not exc.skipped:
                logger.warning("job %s: ending not recorded yet: %s", job.id, exc)
            return False
        return True

    def _record_only_copy(self, delivery: Delivery, callback: CallbackDelivery) -> Publish:
        """The event without its URL: it comes back from a delay tier only to be recorded."""
        delay_s = self._schedule.distinct_delays_s()[0]
        message = OutgoingMessage(
            encode(msgspec.structs.replace(callback, callback_url=None)),
            message_id=delivery.message_id or "unknown",
            headers={ATTEMPT_HEADER: 1},
            expiration_ms=self._schedule.jittered_ms(delay_s),
        )
        return self._callback_outcome(message, self._topology.callback_retry_queue(delay_s))

    def _record(self, host: str, breaker: CircuitBreaker, ok: bool) -> None:
        if not ok:
            breaker.record_failure()
            return
        breaker.record_success()
        # Dropped only while nothing else holds it: a delivery under way records on it.
        if breaker.state is BreakerState.CLOSED and self.slots.held(host) == 0:
            self._breakers.pop(host, None)

    async def _retry_or_park(
        self,
        delivery: Delivery,
        callback: CallbackDelivery,
        attempt: int,
        result: DeliveryResult,
        unrecorded: list[Publish],
    ) -> None:
        delay_s = self._schedule.delay_after(attempt)
        if delay_s is None:
            logger.warning(
                "callback %s given up after %d attempts: %s", callback.webhook_id, attempt, result.error
            )
            await self._park(delivery, f"gave up after {attempt} attempts: {result.error}", unrecorded)
            self._delivery_log.note(callback.event.data.id, "parked", attempt)
            return
        if result.retry_after_s is not None:
            delay_s = max(delay_s, self._tier_at_least(result.retry_after_s))
        logger.info(
            "callback %s attempt %d failed (%s); next in %.1f s",
            callback.webhook_id,
            attempt,
            result.error,
            delay_s,
        )
        await self._republish(delivery, attempt + 1, delay_s)
        self._delivery_log.note(callback.event.data.id, "pending", attempt)

    def _tier_at_least(self, wait_s: float) -> float:
        """The shortest delay tier that waits at least `wait_s` (else the longest)."""
        delays = self._schedule.distinct_delays_s()
        return min((d for d in delays if d >= wait_s), default=delays[-1])

    async def _defer(self, delivery: Delivery, attempt: int, wait_s: float, reason: str) -> None:
        """Wait in a delay tier without spending an attempt (breaker open or host over its
        share), at most CALLBACK_MAX_DEFERRALS times: a host that stays unusable for that
        long gets its callbacks parked (replayable), not churned through the tiers forever."""
        deferred = int(delivery.headers.get(DEFERRALS_HEADER, 0))
        if deferred >= self._settings.callback_max_deferrals:
            logger.warning("callback %s parked after %d deferrals", delivery.message_id, deferred)
            await self._park(
                delivery, f"deferred {deferred} times (its host's breaker open or host saturated)"
            )
            return
        self.deferrals += 1
        self.metrics.deferred(reason)
        await self._republish(
            delivery, attempt, self._tier_at_least(wait_s), {DEFERRALS_HEADER: deferred + 1}
        )

    async def _republish(
        self, delivery: Delivery, attempt: int, delay_s: float, extra_headers: dict[str, int] | None = None
    ) -> None:
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, ATTEMPT_HEADER: attempt, **(extra_headers or {})},
            expiration_ms=self._schedule.jittered_ms(delay_s),
        )
        retry = self._callback_outcome(message, self._topology.callback_retry_queue(delay_s))
        await settle(self._broker, [(delivery, [retry])])

    async def _park(self, delivery: Delivery, reason: str, also: list[Publish] | None = None) -> None:
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, PARK_REASON_HEADER: reason[:1000]},
        )
        park = self._callback_outcome(message, self._topology.callbacks_parking_queue)
        await settle(self._broker, [(delivery, [park, *(also or [])])])
        self.metrics.parked()

    def _callback_outcome(self, message: OutgoingMessage, queue: str) -> Publish:
        """To `queue` through the dispatcher's own exchange (never the default one)."""
        return Publish(message, queue, exchange=self._topology.callback_outcomes_exchange)
