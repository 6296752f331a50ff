"""The callback stage: delivers finished jobs' events, separate from inference.

A worker only publishes a `CallbackDelivery` to the callbacks queue and acks its job,
so a slow or dead receiver never holds a model replica. The dispatcher retries each
delivery on the configured schedule; a delivery that cannot be made is published to
the callbacks parking lot with the reason, and acked only once that publish is
confirmed: an event is delivered or visibly parked, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from contract.broker import Broker, BrokerError, Delivery, OutgoingMessage
from contract.callback_guard import Resolver, resolve_with_system_dns
from contract.envelope import (
    PARK_REASON_HEADER,
    CallbackDelivery,
    UndecodableMessage,
    decode_callback_delivery,
)
from ray_workers.callback_client import CallbackClient, DeliveryResult
from ray_workers.settings import WorkerSettings
from ray_workers.signing import WebhookSigner

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60.0


class CallbackDispatcher:
    def __init__(
        self,
        settings: WorkerSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        resolve: Resolver = resolve_with_system_dns,
    ) -> None:
        self._settings = settings
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

    @property
    def is_healthy(self) -> bool:
        return self._broker.is_ready

    async def start(self) -> None:
        await self._broker.connect()
        self._consumer_tag = await self._broker.consume(
            self._settings.topology.callbacks_queue,
            self._settings.callback_concurrency,
            self._on_delivery,
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
        result = await self._deliver_with_retries(callback)
        if result.delivered:
            await self._settle(delivery, None)
        else:
            logger.warning(
                "callback %s to %s given up: %s", callback.webhook_id, callback.callback_url, result.error
            )
            await self._park(delivery, result.error or "undeliverable")

    async def _deliver_with_retries(self, callback: CallbackDelivery) -> DeliveryResult:
        result = DeliveryResult(delivered=False, retryable=True, error="not attempted")
        for attempt, delay_s in enumerate(self._settings.callback_retry_delays_s, start=1):
            wait_s = max(delay_s, min(result.retry_after_s or 0.0, MAX_RETRY_AFTER_S))
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            result = await self._client.deliver(callback)
            if result.delivered or not result.retryable:
                return result
            logger.warning("callback %s attempt %d failed: %s", callback.webhook_id, attempt, result.error)
        return result

    async def _park(self, delivery: Delivery, reason: str) -> None:
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, PARK_REASON_HEADER: reason},
        )
        await self._settle(delivery, message)

    async def _settle(self, delivery: Delivery, parked: OutgoingMessage | None) -> None:
        """Ack only after a parked event is confirmed in the parking lot."""
        try:
            if parked is not None:
                await self._broker.publish(parked, self._settings.topology.callbacks_parking_queue)
            await delivery.ack()
        except BrokerError as exc:
            logger.warning("callback %s left unacked for redelivery: %s", delivery.message_id, exc)
