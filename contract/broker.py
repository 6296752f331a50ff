"""The one home of aio-pika: connect, declare, publish with confirms, consume, settle.

Errors raised here, the only ones callers see:

    BrokerError
    ├── BrokerUnavailable   retryable: no connection, channel closed, confirm timed out
    └── PublishRejected     the broker refused the message: nacked (queue full with
                            reject-publish) or returned as unroutable (mandatory)

Publishes wait for the publisher confirm, so a returned call means the message is on
disk in a queue (persistent messages, durable queues). The connection is robust: it
reconnects and restores channels, queues and consumers after a broker restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from contract.topology import QueueSpec, Topology

logger = logging.getLogger(__name__)

# How often a lost connection is retried; short, since a restart usually takes seconds.
RECONNECT_INTERVAL_S = 1.0

_CONNECTION_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class BrokerError(Exception):
    """Base of every broker failure callers handle."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; try again later."""


class PublishRejected(BrokerError):
    """The broker answered but did not take the message."""


def redact_url(url: str) -> str:
    """The AMQP URL with its password replaced, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    message_id: str
    correlation_id: str | None = None
    priority: int | None = None
    headers: Mapping[str, Any] | None = None
    type: str | None = None
    # Per-message TTL; only ever set below a delay queue's own TTL (see retry_tiers).
    expiration_ms: int | None = None


class Delivery:
    """One consumed message. Settled by `ack` once its outcome is durable; never nack-requeued
    (that loops): left unacked, it returns to the queue when its channel closes."""

    def __init__(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._message = message
        self.body: bytes = message.body
        self.headers: Mapping[str, Any] = dict(message.headers or {})
        self.message_id: str | None = message.message_id

    async def ack(self) -> None:
        try:
            await self._message.ack()
        except _CONNECTION_ERRORS as exc:
            # The broker will redeliver it: at-least-once, never lost.
            raise BrokerUnavailable(f"ack of {self.message_id} failed: {exc}") from exc


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class Broker:
    """A robust connection, a confirming publish channel and consumer channels."""

    def __init__(self, url: str, topology: Topology, models: tuple[str, ...]) -> None:
        self._url = url
        self._topology = topology
        self._models = models
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._consumers: dict[str, tuple[aio_pika.abc.AbstractQueue, aio_pika.abc.AbstractChannel]] = {}

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def is_ready(self) -> bool:
        connection = self._connection
        channel = self._publish_channel
        return bool(connection and not connection.is_closed and channel and not channel.is_closed)

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect, declare the topology, open the publish channel."""
        try:
            self._connection = await aio_pika.connect_robust(
                self._url, timeout=timeout_s, reconnect_interval=RECONNECT_INTERVAL_S
            )
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await self._declare(self._publish_channel)
        except _CONNECTION_ERRORS as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(self._url)}: {exc!r}") from exc

    async def _declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.declare_exchange(
            self._topology.jobs_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for spec in self._topology.queues(self._models):
            await self._declare_queue(channel, spec)

    @staticmethod
    async def _declare_queue(channel: aio_pika.abc.AbstractChannel, spec: QueueSpec) -> None:
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        for exchange, routing_key in spec.bindings:
            await queue.bind(exchange, routing_key)

    async def publish(
        self,
        message: OutgoingMessage,
        routing_key: str,
        *,
        exchange: str = "",
        timeout_s: float = 10.0,
    ) -> None:
        """Publish persistently and return once the broker confirmed it."""
        channel = self._publish_channel
        if channel is None or channel.is_closed:
            raise BrokerUnavailable("no open channel to RabbitMQ")
        amqp_message = aio_pika.Message(
            message.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            priority=message.priority,
            headers=dict(message.headers or {}),
            timestamp=datetime.now(UTC),
            type=message.type,
            expiration=None
            if message.expiration_ms is None
            else timedelta(milliseconds=message.expiration_ms),
        )
        try:
            target = (
                await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
            )
            await target.publish(amqp_message, routing_key, mandatory=True, timeout=timeout_s)
        except aiormq.exceptions.PublishError as exc:
            raise PublishRejected(
                f"message {message.message_id} is unroutable via {exchange or '(default)'} "
                f"with key {routing_key!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise PublishRejected(
                f"broker nacked message {message.message_id} (queue {routing_key!r} full?)"
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"publish of {message.message_id} failed: {exc!r}") from exc

    async def consume(self, queue_name: str, prefetch: int, handler: DeliveryHandler) -> str:
        """Start consuming on a channel of its own (prefetch is per channel); returns a tag."""
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        try:
            channel = await self._connection.channel()
            # Channel-wide (global) prefetch: one consumer per channel, and unlike the
            # per-consumer kind it can be changed while the consumer runs.
            await channel.set_qos(prefetch_count=prefetch, global_=True)
            queue = await channel.get_queue(queue_name, ensure=True)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await handler(Delivery(message))

            tag = await queue.consume(on_message)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot consume {queue_name}: {exc!r}") from exc
        self._consumers[tag] = (queue, channel)
        return tag

    async def set_prefetch(self, tag: str, prefetch: int) -> None:
        """Change a consumer's prefetch at runtime (basic.qos on its channel)."""
        _queue, channel = self._consumers[tag]
        try:
            await channel.set_qos(prefetch_count=prefetch, global_=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot set prefetch of consumer {tag}: {exc!r}") from exc

    async def cancel(self, tag: str, *, close_channel: bool = False) -> None:
        """Stop a consumer (basic.cancel). What it holds unacked stays with it until
        settled, unless `close_channel`, which hands all of it back to the queue."""
        queue, channel = self._consumers[tag]
        try:
            await queue.cancel(tag)
            if close_channel:
                del self._consumers[tag]
                await channel.close()
        except _CONNECTION_ERRORS as exc:
            logger.warning("cancel of consumer %s failed: %r", tag, exc)

    async def close(self) -> None:
        """Close consumer channels (unacked messages return to their queues), then the rest."""
        for _queue, channel in self._consumers.values():
            if not channel.is_closed:
                await channel.close()
        self._consumers.clear()
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()
        self._connection = None
        self._publish_channel = None

    @contextlib.asynccontextmanager
    async def fetching(self, queue_name: str) -> AsyncIterator[Callable[[], Awaitable[Delivery | None]]]:
        """Pull messages one by one (basic.get) on a channel of their own. Whatever is not
        acked when the block ends goes back to the queue, in its original order."""
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        try:
            channel = await self._connection.channel()
            queue = await channel.get_queue(queue_name, ensure=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc

        async def next_message() -> Delivery | None:
            try:
                message = await queue.get(fail=False, no_ack=False)
            except _CONNECTION_ERRORS as exc:
                raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc
            return None if message is None else Delivery(message)

        try:
            yield next_message
        finally:
            if not channel.is_closed:
                await channel.close()

    async def delete_topology(self) -> None:
        """Delete every queue and the exchange this topology declares (benchmarks, teardown)."""
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        try:
            async with self._connection.channel() as channel:
                for spec in self._topology.queues(self._models):
                    await channel.queue_delete(spec.name)
                await channel.exchange_delete(self._topology.jobs_exchange)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot delete the topology: {exc!r}") from exc

    async def queue_depth(self, queue_name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, via a passive declare."""
        if self._connection is None:
            raise BrokerUnavailable("not connected")
        try:
            async with self._connection.channel() as channel:
                queue = await channel.declare_queue(queue_name, passive=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot inspect {queue_name}: {exc!r}") from exc
        result = queue.declaration_result
        return result.message_count or 0, result.consumer_count or 0
