"""The callback stage: delivers finished jobs' events, separate from inference.

A worker only publishes a `CallbackDelivery` to the callbacks queue and acks its job,
so a slow or dead receiver never holds a model replica and never makes the model run
again. The dispatcher makes one attempt per delivery; a retryable failure goes to the
delay tier of its next attempt (TTL + dead-letter back to the callbacks queue), so no
message is held while it waits. After the last attempt, or on a permanent failure
(410 Gone, other 4xx, a URL the guard refuses), the event goes to the callbacks
parking lot with the reason. Every path acks only after its publish is confirmed.

Isolation between targets: each callback host has a circuit breaker and a bound on
deliveries in flight. A delivery whose host is open or full is deferred to the
shortest tier without spending an attempt, so one dead or slow target cannot take
the prefetch window that every other target's deliveries need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from urllib.parse import urlsplit

import httpx

from contract.broker import Broker, BrokerError, Delivery, OutgoingMessage
from contract.callback_guard import Resolver, resolve_with_system_dns
from contract.envelope import (
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    CallbackDelivery,
    UndecodableMessage,
    decode_callback_delivery,
)
from ray_workers.callback_client import CallbackClient, DeliveryResult
from ray_workers.circuit_breaker import CircuitBreaker
from ray_workers.settings import WorkerSettings
from ray_workers.signing import WebhookSigner

logger = logging.getLogger(__name__)


class CallbackDispatcher:
    def __init__(
        self,
        settings: WorkerSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        resolve: Resolver = resolve_with_system_dns,
    ) -> None:
        self._settings = settings
        self._topology = settings.topology
        self._schedule = settings.topology.callback_retries
        self._broker = Broker(settings.amqp_url, settings.topology, settings.models)
        self._client = CallbackClient(
            WebhookSigner(settings.webhook_secret),
            settings.callback_allow,
            settings.callback_timeout_s,
            transport,
            resolve,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumer_tag: str | None = None
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def is_healthy(self) -> bool:
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
            self._topology.callbacks_queue, self._settings.callback_concurrency, self._on_delivery
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

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            callback = decode_callback_delivery(delivery.body)
        except UndecodableMessage as exc:
            await self._park(delivery, str(exc))
            return
        attempt = int(delivery.headers.get(ATTEMPT_HEADER, 1))
        host = (urlsplit(callback.callback_url).hostname or "").lower()
        breaker = self.breaker_for(host)
        if self._in_flight[host] >= self._settings.callback_host_concurrency or not breaker.allow():
            await self._defer(delivery, attempt)
            return
        self._in_flight[host] += 1
        try:
            result = await self._client.deliver(callback)
        finally:
            self._in_flight[host] -= 1
        if result.delivered:
            breaker.record_success()
            await self._settle(delivery, [])
        elif result.retryable:
            breaker.record_failure()
            await self._retry_or_park(delivery, callback, attempt, result)
        else:
            breaker.record_success()  # the host answered; it is the request that is refused
            logger.warning("callback %s refused for good: %s", callback.webhook_id, result.error)
            await self._park(delivery, result.error or "refused")

    async def _retry_or_park(
        self, delivery: Delivery, callback: CallbackDelivery, attempt: int, result: DeliveryResult
    ) -> None:
        delay_s = self._schedule.delay_after(attempt)
        if delay_s is None:
            logger.warning(
                "callback %s given up after %d attempts: %s", callback.webhook_id, attempt, result.error
            )
            await self._park(delivery, f"gave up after {attempt} attempts: {result.error}")
            return
        if result.retry_after_s is not None:
            # Honour Retry-After with the shortest tier that waits at least that long.
            longer = [d for d in self._schedule.distinct_delays_s() if d >= result.retry_after_s]
            delay_s = max(delay_s, min(longer, default=self._schedule.distinct_delays_s()[-1]))
        logger.info(
            "callback %s attempt %d failed (%s); next in %.1f s",
            callback.webhook_id,
            attempt,
            result.error,
            delay_s,
        )
        await self._republish(delivery, attempt + 1, delay_s)

    async def _defer(self, delivery: Delivery, attempt: int) -> None:
        """Wait in the shortest tier without spending an attempt (host open or saturated)."""
        await self._republish(delivery, attempt, self._schedule.distinct_delays_s()[0])

    async def _republish(self, delivery: Delivery, attempt: int, delay_s: float) -> None:
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, ATTEMPT_HEADER: attempt},
            expiration_ms=self._schedule.jittered_ms(delay_s),
        )
        await self._settle(delivery, [(message, self._topology.callback_retry_queue(delay_s))])

    async def _park(self, delivery: Delivery, reason: str) -> None:
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, PARK_REASON_HEADER: reason[:1000]},
        )
        await self._settle(delivery, [(message, self._topology.callbacks_parking_queue)])

    async def _settle(self, delivery: Delivery, publishes: list[tuple[OutgoingMessage, str]]) -> None:
        """Ack only after whatever replaces the delivery is confirmed by the broker."""
        try:
            for message, queue in publishes:
                await self._broker.publish(message, queue)
            await delivery.ack()
        except BrokerError as exc:
            logger.warning("callback %s left unacked for redelivery: %s", delivery.message_id, exc)
