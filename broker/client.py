"""The one home of aio-pika: connect, declare, publish with confirms, consume, settle.

Errors raised here, the only ones callers see:

    BrokerError
    ├── BrokerUnavailable   retryable: no connection, channel closed, confirm timed out
    │   └── PublishUncertain  the message was written, its confirm never came: it
    │                         may be queued (a caller with an idempotency key keeps it)
    ├── PublishRejected     the broker refused the message: nacked or returned as
    │                       unroutable (mandatory)
    ├── TopologyMismatch    a queue exists with other arguments (an older version or
    │                       another setting declared it): an operator must act
    └── TopologyMissing     DECLARE_TOPOLOGY=false and a queue or exchange does not
                            exist yet (`python -m broker_access apply` declares them)

Publishes wait for the publisher confirm, so a returned call means the message is on
disk in a queue (persistent messages, durable queues). Publishing and consuming use two
connections, both robust (they reconnect and restore channels, queues and consumers
after a broker restart): under a memory or disk alarm the broker blocks publishing
connections only, so acks still flow, and a publish is refused at once, unwritten.

AMQP_URL may name several nodes of one cluster, comma-separated. Each connection goes
to the first that answers; when its node stays away longer than FAILOVER_AFTER_S the
connection moves to another node and re-opens its channels and consumers there (what a
node's death takes with it, a classic queue that lived on it, comes back with the node;
replicated quorum queues carry on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions

from wire.envelope import UndecodableMessage
from wire.job_chunk import ChunkedJob, chunked_jobs
from wire.outgoing import OutgoingMessage
from wire.topology import QUEUE_VERSION_ARGUMENT, QueueSpec, Topology

logger = logging.getLogger(__name__)

# How often a lost connection is retried; short, since a restart usually takes seconds.
RECONNECT_INTERVAL_S = 1.0
HEAL_ATTEMPTS = 30
# How long a lost connection may try its own node again before it moves to another one.
FAILOVER_AFTER_S = 3.0
# A publish channel that had a nack is replaced at most this often: while a queue has no
# leader every publish is nacked, and a channel per nack would pile up channels.
CHANNEL_RETIRE_AFTER_S = 1.0

_CONNECTION_ERRORS = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    # A RuntimeError subclass: an operation on a channel the broker has closed.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
# Opening a channel while a robust connection is between a loss and its reconnect raises
# a plain RuntimeError ("Connection was not opened", "... closed").
_CHANNEL_ERRORS = (*_CONNECTION_ERRORS, RuntimeError)
# A publish channel that does not open in this long (a stalled connection) is a 503.
CHANNEL_OPEN_TIMEOUT_S = 5.0
# A basic.cancel, channel close or connection close that gets no answer in this long is
# given up (a stalled broker): a stopping worker or dispatcher must not wait on it for
# ever. What the channel held unacked goes back to its queue when the broker drops it.
SHUTDOWN_RPC_TIMEOUT_S = 5.0


class BrokerError(Exception):
    """Base of every broker failure callers handle."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; try again later."""


class PublishRejected(BrokerError):
    """The broker answered but did not take the message."""


class PublishUncertain(BrokerUnavailable):
    """The message was written but its confirm never came (a timeout, or the channel or
    connection closed meanwhile): it may or may not be queued."""


class TopologyMismatch(BrokerError):
    """A queue or exchange exists with arguments other than this version declares."""


class TopologyMissing(BrokerError):
    """A queue or exchange this component uses does not exist, and it may not declare it."""


def broker_urls(url: str) -> tuple[str, ...]:
    """AMQP_URL as the nodes it names: one URL, or several separated by commas."""
    return tuple(part.strip() for part in url.split(",") if part.strip())


# `scheme://user:password@`: the password runs to the next '@', commas included (a comma
# in a password would otherwise split it between two "URLs", each kept whole).
_CREDENTIALS = re.compile(r"(://[^:@/,]*):[^@]*@")


def redact_url(url: str) -> str:
    """The AMQP URL(s) with passwords replaced, for logs and errors (when in doubt, more
    is hidden, never less)."""
    return _CREDENTIALS.sub(r"\1:***@", url)


# Unsettled delivery tags per underlying (aiormq) channel. A robust channel gets a new
# one after a reconnect, and tags restart there, so tags are only compared within one.
UnsettledTags = weakref.WeakKeyDictionary[object, set[int]]


class Delivery:
    """One consumed message, settled exactly once: `ack` once its outcome is durable, or
    `requeue` when that outcome could not be made durable (never in a loop: only for a
    refused or timed-out publish). Left unsettled, it returns to the queue when its
    channel closes; `ack_all` acks many at once."""

    def __init__(self, message: aio_pika.abc.AbstractIncomingMessage, unsettled: UnsettledTags) -> None:
        self._message = message
        self._channel = message.channel
        self._unsettled = unsettled.setdefault(self._channel, set())
        self.body: bytes = message.body
        self.headers: Mapping[str, Any] = message.headers or {}
        self.message_id: str | None = message.message_id
        self.priority: int = message.priority or 0
        self.type: str | None = message.type
        self.delivery_tag: int = message.delivery_tag or 0
        self._unsettled.add(self.delivery_tag)

    @property
    def settled(self) -> bool:
        """Acked or requeued already (by this process)."""
        return self.delivery_tag not in self._unsettled

    @property
    def channel_open(self) -> bool:
        """False once its channel closed: the broker has already given it to someone else."""
        return not self._channel.is_closed

    async def ack(self) -> None:
        self._unsettled.discard(self.delivery_tag)
        try:
            await self._message.ack()
        except _CONNECTION_ERRORS as exc:
            # The broker will redeliver it: at-least-once, never lost.
            raise BrokerUnavailable(f"ack of {self.message_id} failed: {exc}") from exc

    async def requeue(self) -> None:
        """Give it back to the queue now (basic.nack, requeue)."""
        self._unsettled.discard(self.delivery_tag)
        try:
            await self._message.nack(requeue=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"requeue of {self.message_id} failed: {exc}") from exc


class _Chunk:
    """A chunk's delivery (`wire.job_chunk`) and how its parts were settled so far."""

    def __init__(self, delivery: Delivery, parts: int) -> None:
        self.delivery = delivery
        self.parts = parts
        self.unsettled_parts = parts
        self.requeued_parts = 0

    def part_settled(self, requeued: bool) -> bool:
        """Count one part settled; True once it was the last."""
        self.unsettled_parts -= 1
        self.requeued_parts += requeued
        return self.unsettled_parts == 0

    async def settle(self) -> None:
        """Every part settled: ack the chunk, or give it back whole if a part was requeued
        (its jobs that ended then send their recorded ending again, same webhook-id)."""
        if self.requeued_parts:
            await self.delivery.requeue()
        else:
            await self.delivery.ack()


class ChunkPart(Delivery):
    """One job of a chunk delivery, settled on its own as if it had come alone; the chunk
    is settled with its last part (`_Chunk.settle`). It has no message of its own, so
    Delivery's constructor (which registers one) is not called."""

    def __init__(self, chunk: _Chunk, job: ChunkedJob) -> None:
        self._chunk = chunk
        self._settled = False
        self.body = job.body
        self.headers = job.headers
        self.message_id = job.message_id
        self.priority = job.priority
        self.type = "job"
        self.delivery_tag = chunk.delivery.delivery_tag

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def channel_open(self) -> bool:
        return self._chunk.delivery.channel_open

    @property
    def chunk_started(self) -> bool:
        """Whether another part of its chunk is settled already."""
        return self._chunk.unsettled_parts < self._chunk.parts

    def _settle(self, requeued: bool) -> _Chunk | None:
        """Mark it settled; the chunk when this was its last unsettled part."""
        if self._settled:
            return None
        self._settled = True
        return self._chunk if self._chunk.part_settled(requeued) else None

    async def ack(self) -> None:
        if (chunk := self._settle(requeued=False)) is not None:
            await chunk.settle()

    async def requeue(self) -> None:
        if (chunk := self._settle(requeued=True)) is not None:
            await chunk.settle()


def chunk_parts(delivery: Delivery) -> list[Delivery]:
    """A chunk delivery's jobs, one delivery each; an undecodable chunk stays whole (the
    worker parks it as it is)."""
    try:
        jobs = chunked_jobs(delivery.body)
    except UndecodableMessage:
        return [delivery]
    if not jobs:
        return [delivery]
    chunk = _Chunk(delivery, len(jobs))
    return [ChunkPart(chunk, job) for job in jobs]


async def ack_all(deliveries: Sequence[Delivery]) -> None:
    """Ack every delivery, with one `basic.ack multiple` per channel where that acks
    exactly these (no other unsettled delivery of that channel has a lower tag), else one
    by one. Fewer frames for the broker at a backlog; the same guarantee. A chunk's parts
    ack their chunk with the last of them."""
    finished: list[_Chunk] = []
    for part in (d for d in deliveries if isinstance(d, ChunkPart)):
        if (chunk := part._settle(requeued=False)) is not None:
            finished.append(chunk)
    deliveries = [d for d in deliveries if not isinstance(d, ChunkPart)]
    for chunk in (c for c in finished if c.requeued_parts):
        await chunk.settle()
    deliveries += [c.delivery for c in finished if not c.requeued_parts]
    by_channel: dict[int, list[Delivery]] = {}
    for delivery in deliveries:
        by_channel.setdefault(id(delivery._unsettled), []).append(delivery)
    for group in by_channel.values():
        unsettled = group[0]._unsettled
        last = max(group, key=lambda d: d.delivery_tag)
        tags = {d.delivery_tag for d in group}
        covered = all(tag in tags for tag in unsettled if tag <= last.delivery_tag)
        if len(group) == 1 or not covered or not last.channel_open:
            for delivery in group:
                await delivery.ack()
            continue
        unsettled.difference_update(tags)
        try:
            await last._message.ack(multiple=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"ack of {len(group)} deliveries failed: {exc}") from exc


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


@dataclass
class _Consumer:
    """What it takes to (re)start one consumer, and the channel it runs on now."""

    queue_name: str
    prefetch: int
    handler: DeliveryHandler
    # Channel-wide prefetch can change while the consumer runs; quorum queues refuse it.
    channel_wide_prefetch: bool = True
    channel: aio_pika.abc.AbstractChannel | None = None
    queue: aio_pika.abc.AbstractQueue | None = None
    tag: str | None = None
    cancelled: bool = False


class Broker:
    """A robust connection, a confirming publish channel and consumer channels.

    aio-pika's robust connection reconnects and restores channels and consumers, but a
    channel whose restore races the connection's loss can stay closed. After every
    reconnect the broker checks its own channels and re-opens what is still closed, and
    a publish on a closed channel re-opens it first, so a broker restart never leaves a
    service connected but unable to publish or consume.
    """

    def __init__(self, url: str, topology: Topology, models: tuple[str, ...], role: str = "client") -> None:
        self._url = url
        self._urls = broker_urls(url)
        # The node each live connection went to, so a failover starts with the others.
        self._node_of: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._failovers: set[asyncio.Task[None]] = set()
        self._closing = False
        # Connections are named `{prefix}{role}.publish|consume` in the broker's management UI.
        self._connection_name = f"{topology.prefix}{role}"
        self._topology = topology
        self._models = models
        # Publishing and consuming use separate connections: under a memory or disk alarm
        # the broker stops reading publishing connections, and acks must still get through.
        self._publish_connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._consume_connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._events_channel: aio_pika.abc.AbstractChannel | None = None
        # Depth reads share one channel: opening one per read cost more than the read.
        self._inspect_channel: aio_pika.abc.AbstractChannel | None = None
        self._channel_lock = asyncio.Lock()
        self._inspect_lock = asyncio.Lock()
        self._consumers: dict[str, _Consumer] = {}
        self._healing: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()  # nacking publish channels, closing
        self._publish_channel_opened_at = 0.0
        self._unsettled: UnsettledTags = weakref.WeakKeyDictionary()
        self._consumer_ids = itertools.count(1)
        # Set once the topology is declared: before that a publish could find no binding.
        self._declared = False

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def is_ready(self) -> bool:
        """Connected (not between a loss and the reconnect) with the topology declared."""
        connections = (self._publish_connection, self._consume_connection)
        connected = all(c is not None and c.connected.is_set() and not c.is_closed for c in connections)
        return self._declared and connected

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes (redacted URLs) the publish and consume connections use now."""
        connections = (self._publish_connection, self._consume_connection)
        return tuple(
            redact_url(self._urls[self._node_of[c]])
            for c in connections
            if c is not None and c in self._node_of
        )

    @property
    def publishing_blocked(self) -> bool:
        """The broker sent connection.blocked (a resource alarm): it reads no publish now."""
        return self._publish_connection is not None and _blocked_event(self._publish_connection) is not None

    async def wait_until_publishable(self) -> None:
        """Return once the broker reads publishes again (at once when it is not blocking)."""
        if (
            self._publish_connection is not None
            and (event := _blocked_event(self._publish_connection)) is not None
        ):
            await event.wait()

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect, declare the topology, open the publish channel."""
        try:
            self._publish_connection = await self._connect_robust("publish", timeout_s)
            self._consume_connection = await self._connect_robust("consume", timeout_s)
            await self._declare(await self._open_publish_channel())
            self._declared = True
        except (TopologyMismatch, TopologyMissing):
            await self.close()
            raise
        except _CONNECTION_ERRORS as exc:
            await self.close()
            raise BrokerUnavailable(f"cannot reach RabbitMQ at {redact_url(self._url)}: {exc!r}") from exc

    async def _connect_robust(
        self, purpose: str, timeout_s: float, after: int = -1
    ) -> aio_pika.abc.AbstractRobustConnection:
        """A robust connection to the first node that answers, trying those after node
        `after` first (a failover leaves the lost node for last)."""
        order = [(after + 1 + step) % len(self._urls) for step in range(len(self._urls))]
        failure: BaseException | None = None
        for index in order:
            try:
                connection = await aio_pika.connect_robust(
                    self._urls[index],
                    timeout=timeout_s,
                    reconnect_interval=RECONNECT_INTERVAL_S,
                    client_properties={"connection_name": f"{self._connection_name}.{purpose}"},
                )
            except _CONNECTION_ERRORS as exc:
                failure = exc
                continue
            self._node_of[connection] = index
            connection.reconnect_callbacks.add(self._heal_after_reconnect)
            if len(self._urls) > 1:
                connection.close_callbacks.add(self._on_connection_lost)
            return connection
        if failure is None:
            raise BrokerUnavailable("AMQP_URL names no broker")
        raise failure

    def _on_connection_lost(self, connection: object, *_args: object) -> None:
        if self._closing or connection not in (self._publish_connection, self._consume_connection):
            return
        if not isinstance(connection, aio_pika.abc.AbstractRobustConnection):
            return
        task = asyncio.create_task(self._fail_over(connection))
        self._failovers.add(task)
        task.add_done_callback(self._failovers.discard)

    async def _fail_over(self, lost: aio_pika.abc.AbstractRobustConnection) -> None:
        """Give the lost connection FAILOVER_AFTER_S to come back to its node, then move
        its role to another node and re-open what it carried there."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lost.connected.wait(), FAILOVER_AFTER_S)
            return
        purpose = "publish" if lost is self._publish_connection else "consume"
        while not self._closing:
            try:
                replacement = await self._connect_robust(
                    purpose, FAILOVER_AFTER_S, self._node_of.get(lost, -1)
                )
                break
            except _CONNECTION_ERRORS as exc:
                logger.warning("%s connection: no node answers yet (%r); trying again", purpose, exc)
                await asyncio.sleep(RECONNECT_INTERVAL_S)
        else:
            return
        if lost is self._publish_connection:
            self._publish_connection, self._publish_channel, self._events_channel = replacement, None, None
        elif lost is self._consume_connection:
            self._consume_connection, self._inspect_channel = replacement, None
            for consumer in self._consumers.values():
                consumer.channel = None  # on the lost connection: re-opened on the new one
        else:
            await replacement.close()  # the broker closed meanwhile
            return
        logger.warning(
            "%s connection moved to %s after its node stayed away %.0f s",
            purpose,
            redact_url(self._urls[self._node_of[replacement]]),
            FAILOVER_AFTER_S,
        )
        with contextlib.suppress(*_CONNECTION_ERRORS):
            await lost.close()  # ends its own reconnect loop
        await self._heal_after_reconnect(replacement)

    async def _open_publish_channel(self) -> aio_pika.abc.AbstractChannel:
        channel = self._publish_channel
        if channel is not None and not channel.is_closed:
            return channel  # the hot path: no lock to take for every publish
        async with self._channel_lock:
            channel = self._publish_channel
            if channel is None or channel.is_closed:
                if self._publish_connection is None:
                    raise BrokerUnavailable("not connected")
                try:
                    async with asyncio.timeout(CHANNEL_OPEN_TIMEOUT_S):
                        channel = await self._publish_connection.channel(
                            publisher_confirms=True, on_return_raises=True
                        )
                except TimeoutError as exc:
                    raise BrokerUnavailable(
                        f"no channel opened within {CHANNEL_OPEN_TIMEOUT_S:.0f} s"
                    ) from exc
                except RuntimeError as exc:  # aiormq: "<Connection ...> closed" mid-reconnect
                    raise BrokerUnavailable(f"cannot open a channel: {exc}") from exc
                self._publish_channel = channel
                self._publish_channel_opened_at = time.monotonic()
            return channel

    async def _heal_after_reconnect(self, connection: object, *_args: object) -> None:
        """Re-open what the reconnected connection carries. Each connection heals its own
        part: the other may still be reconnecting, and its failure must not stop this one.
        A failed heal is tried again (HEAL_ATTEMPTS, a second apart) in the background:
        a reconnect that succeeds leaves no next reconnect to retry it."""
        try:
            await self._heal(connection)
        except BrokerError as exc:
            logger.warning("healing after a reconnect failed, retrying in the background: %r", exc)
            task = asyncio.create_task(self._heal_in_background(connection))
            self._healing.add(task)
            task.add_done_callback(self._healing.discard)

    async def _heal_in_background(self, connection: object) -> None:
        for _ in range(HEAL_ATTEMPTS):
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            try:
                await self._heal(connection)
                return
            except BrokerError as exc:
                logger.warning("healing after a reconnect failed again: %r", exc)

    async def _heal(self, connection: object) -> None:
        if connection is self._publish_connection:
            await self._open_publish_channel()
        if connection is self._consume_connection:
            for consumer in self._consumers.values():
                if not consumer.cancelled and (consumer.channel is None or consumer.channel.is_closed):
                    logger.warning(
                        "consumer of %s was not restored after a reconnect; re-opening it",
                        consumer.queue_name,
                    )
                    await self._start(consumer)

    async def _declare(self, channel: aio_pika.abc.AbstractChannel) -> None:
        if not self._topology.declared_by_clients:
            await self._check_declared(channel)
            return
        for exchange in self._topology.exchanges(self._models):
            await channel.declare_exchange(exchange.name, aio_pika.ExchangeType(exchange.kind), durable=True)
        for spec in self._topology.queues(self._models):
            # A refused declaration closes its channel: the next one opens another.
            await self._declare_queue(await self._open_publish_channel(), spec)

    async def _check_declared(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Passive declares (they need no permission): each exchange and queue exists.
        The first missing one closes the channel and stops the start, naming it."""
        names = [(e.name, "exchange") for e in self._topology.exchanges(self._models)]
        names += [(q.name, "queue") for q in self._topology.queues(self._models)]
        for name, kind in names:
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:
                raise TopologyMissing(
                    f"{kind} {name} does not exist and DECLARE_TOPOLOGY is false: run "
                    "`python -m broker_access apply` (the cluster's broker-access Job) first"
                ) from exc

    async def _declare_queue(self, channel: aio_pika.abc.AbstractChannel, spec: QueueSpec) -> None:
        try:
            queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if QUEUE_VERSION_ARGUMENT not in spec.arguments:
                raise _mismatch(spec, exc) from exc
            queue = await self._declare_as_version_1(spec)
        for exchange, routing_key in spec.bindings:
            await queue.bind(exchange, routing_key)

    async def _declare_as_version_1(self, spec: QueueSpec) -> aio_pika.abc.AbstractQueue:
        """A job queue declared before classic queues of version 2 (without the argument)
        is used as it is, so that an upgrade finds its queues and their jobs."""
        arguments = {k: v for k, v in spec.arguments.items() if k != QUEUE_VERSION_ARGUMENT}
        channel = await self._open_publish_channel()
        try:
            queue = await channel.declare_queue(spec.name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _mismatch(spec, exc) from exc
        logger.warning(
            "queue %s was declared without x-queue-version (an older version of inferq) and is used as "
            "it is: on RabbitMQ 3.x it stays a classic queue of version 1, whose publishes are confirmed "
            "later, until the policy `queue-version: 2` converts it in place",
            spec.name,
        )
        return queue

    async def publish(
        self,
        message: OutgoingMessage,
        routing_key: str,
        *,
        exchange: str = "",
        timeout_s: float = 10.0,
    ) -> None:
        """Publish persistently and return once the broker confirmed it. While the broker
        blocks publishers (a memory or disk alarm) nothing is written: a message written
        then would sit unread and reach the queue after the alarm, long after its caller
        was told it failed."""
        if not self.is_ready:
            raise BrokerUnavailable("not connected to RabbitMQ")
        if self.publishing_blocked:
            raise BrokerUnavailable("the broker is blocking publishers (a memory or disk alarm)")
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
            channel = await self._open_publish_channel()
            target = (
                await channel.get_exchange(exchange, ensure=False) if exchange else channel.default_exchange
            )
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"publish of {message.message_id} failed: {exc!r}") from exc
        try:
            await target.publish(amqp_message, routing_key, mandatory=True, timeout=timeout_s)
        except aiormq.exceptions.PublishError as exc:
            raise PublishRejected(
                f"message {message.message_id} is unroutable via {exchange or '(default)'} "
                f"with key {routing_key!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            self._retire_publish_channel(channel, timeout_s)
            raise PublishRejected(
                f"broker nacked message {message.message_id} (queue {routing_key!r} full, or "
                "without a leader)"
            ) from exc
        except _CONNECTION_ERRORS as exc:
            raise PublishUncertain(
                f"message {message.message_id} was sent but not confirmed ({exc!r}): it may be queued"
            ) from exc

    def _retire_publish_channel(self, channel: aio_pika.abc.AbstractChannel, grace_s: float) -> None:
        """Replace a channel that had a publish nacked. On RabbitMQ 3.10 a channel whose first
        publish to a quorum queue comes while the queue's leader is dead takes that leader
        from a stale queue record and nacks the queue for as long as that node stays away
        (60 s of nacks measured; fixed upstream in 2023 by rabbitmq-server#9241): a new
        channel reads the new leader and is confirmed. The old one closes after `grace_s`,
        once publishes still waiting on it have had their confirms or their timeouts; a
        channel younger than CHANNEL_RETIRE_AFTER_S is kept (its next nack replaces it)."""
        if self._publish_channel is not channel:
            return  # already replaced
        if time.monotonic() - self._publish_channel_opened_at < CHANNEL_RETIRE_AFTER_S:
            return
        self._publish_channel = None
        task = asyncio.create_task(self._close_after(channel, grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _close_after(channel: aio_pika.abc.AbstractChannel, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if not channel.is_closed:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await channel.close()

    async def announce(self, routing_key: str, body: bytes) -> None:
        """Publish a transient event on the events exchange: no confirm, not mandatory, not
        persistent. Events are hints (losing one costs a polling interval); jobs never go here."""
        if not self.is_ready or self.publishing_blocked:
            raise BrokerUnavailable("not connected, or the broker blocks publishers")
        try:
            channel = self._events_channel
            if channel is None or channel.is_closed:
                if self._publish_connection is None:
                    raise BrokerUnavailable("not connected")
                channel = self._events_channel = await self._publish_connection.channel(
                    publisher_confirms=False
                )
            exchange = await channel.get_exchange(self._topology.events_exchange, ensure=False)
            # Not mandatory: with nobody listening (no autoscaler at zero) the broker drops
            # it quietly instead of returning it.
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT),
                routing_key,
                mandatory=False,
            )
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"event {routing_key} not published: {exc!r}") from exc

    async def subscribe(self, queue_name: str, binding_key: str, handler: DeliveryHandler) -> str:
        """Consume events matching `binding_key` through `queue_name`, a queue that survives a
        broker restart but removes itself a minute after its last consumer went, and drops
        events older than a few seconds (a stale hint is no hint); returns a consumer id."""
        if self._consume_connection is None:
            raise BrokerUnavailable("not connected")
        try:
            async with self._consume_connection.channel() as channel:
                queue = await channel.declare_queue(
                    queue_name, durable=True, arguments={"x-expires": 60_000, "x-message-ttl": 5_000}
                )
                await queue.bind(self._topology.events_exchange, binding_key)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot subscribe to {binding_key}: {exc!r}") from exc
        return await self.consume(queue_name, 16, handler)

    async def consume(
        self, queue_name: str, prefetch: int, handler: DeliveryHandler, *, replicated: bool = False
    ) -> str:
        """Start consuming on a channel of its own (prefetch is per channel); returns an id.

        `replicated`: a quorum queue, which refuses channel-wide prefetch (the broker
        closes the whole connection): its prefetch is the consumer's own, fixed while it
        runs."""
        consumer = _Consumer(queue_name, prefetch, handler, channel_wide_prefetch=not replicated)
        starting = asyncio.ensure_future(self._start(consumer))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while starting (a worker stopping): cancelling an RPC in flight makes
            # aiormq close its channel under the broker's answer, and a consumer the broker
            # had already started lived on untracked, taking jobs nobody would settle. The
            # start finishes instead; then its channel closes, handing back what it took.
            task = asyncio.create_task(self._close_started(starting, consumer))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            raise
        consumer_id = f"consumer-{next(self._consumer_ids)}"
        self._consumers[consumer_id] = consumer
        return consumer_id

    @staticmethod
    async def _close_started(starting: asyncio.Future[None], consumer: _Consumer) -> None:
        """Once a start its caller gave up on is over, close the channel it opened."""
        with contextlib.suppress(BrokerError):
            await starting
        if consumer.channel is not None and not consumer.channel.is_closed:
            with contextlib.suppress(*_CHANNEL_ERRORS):
                await consumer.channel.close()

    async def _start(self, consumer: _Consumer) -> None:
        if self._consume_connection is None:
            raise BrokerUnavailable("not connected")
        try:
            channel = await self._consume_connection.channel()
            # Channel-wide (global) prefetch: one consumer per channel, and unlike the
            # per-consumer kind it can be changed while the consumer runs.
            await channel.set_qos(prefetch_count=consumer.prefetch, global_=consumer.channel_wide_prefetch)
            queue = await channel.get_queue(consumer.queue_name, ensure=True)

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                await consumer.handler(Delivery(message, self._unsettled))

            consumer.tag = await queue.consume(on_message)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot consume {consumer.queue_name}: {exc!r}") from exc
        consumer.channel, consumer.queue = channel, queue

    async def set_prefetch(self, consumer_id: str, prefetch: int) -> None:
        """Change a consumer's prefetch at runtime (basic.qos on its channel)."""
        consumer = self._consumers[consumer_id]
        if not consumer.channel_wide_prefetch:
            raise BrokerError(f"the prefetch of {consumer.queue_name} (a replicated queue) is fixed")
        consumer.prefetch = prefetch
        if consumer.channel is None:
            raise BrokerUnavailable(f"consumer of {consumer.queue_name} has no channel")
        try:
            await consumer.channel.set_qos(prefetch_count=prefetch, global_=True)
        except _CONNECTION_ERRORS as exc:
            raise BrokerUnavailable(f"cannot set prefetch of {consumer.queue_name}: {exc!r}") from exc

    async def cancel(self, consumer_id: str, *, close_channel: bool = False) -> None:
        """Stop a consumer (basic.cancel). What it holds unacked stays with it until
        settled, unless `close_channel`, which hands all of it back to the queue."""
        consumer = self._consumers[consumer_id]
        consumer.cancelled = True
        if close_channel:
            del self._consumers[consumer_id]
        try:
            async with asyncio.timeout(SHUTDOWN_RPC_TIMEOUT_S):
                if consumer.queue is not None and consumer.tag is not None:
                    await consumer.queue.cancel(consumer.tag)
                if close_channel and consumer.channel is not None and not consumer.channel.is_closed:
                    await consumer.channel.close()
        except _CONNECTION_ERRORS as exc:
            logger.warning("cancel of the consumer of %s failed: %r", consumer.queue_name, exc)

    async def close(self) -> None:
        """Close consumer channels (unacked messages return to their queues), then the rest."""
        self._closing = True
        background = (*self._healing, *self._failovers, *self._retiring)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)  # none left pending at exit
        channels = [c.channel for c in self._consumers.values() if c.channel is not None]
        self._consumers.clear()
        for channel in channels:
            if not channel.is_closed:
                await _closed_within_bound(channel)
        for connection in (self._consume_connection, self._publish_connection):
            if connection is not None and not connection.is_closed:
                await _closed_within_bound(connection)
        self._publish_connection = None
        self._consume_connection = None
        self._events_channel = None
        self._inspect_channel = None
        self._publish_channel = None
        self._declared = False

    @contextlib.asynccontextmanager
    async def fetching(self, queue_name: str) -> AsyncIterator[Callable[[], Awaitable[Delivery | None]]]:
        """Pull messages one by one (basic.get) on a channel of their own. Whatever is not
        acked when the block ends goes back to the queue, in its original order."""
        if self._consume_connection is None:
            raise BrokerUnavailable("not connected")
        try:
            channel = await self._consume_connection.channel()
            queue = await channel.get_queue(queue_name, ensure=True)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc

        async def next_message() -> Delivery | None:
            try:
                message = await queue.get(fail=False, no_ack=False)
            except _CONNECTION_ERRORS as exc:
                raise BrokerUnavailable(f"cannot read {queue_name}: {exc!r}") from exc
            return None if message is None else Delivery(message, self._unsettled)

        try:
            yield next_message
        finally:
            if not channel.is_closed:
                await channel.close()

    async def delete_topology(self) -> None:
        """Delete every queue and exchange this topology declares (benchmarks, teardown)."""
        if self._publish_connection is None:
            raise BrokerUnavailable("not connected")
        try:
            async with self._publish_connection.channel() as channel:
                for spec in self._topology.queues(self._models):
                    await channel.queue_delete(spec.name)
                await channel.queue_delete(self._topology.demand_queue)
                await channel.queue_delete(self._topology.push_scaler_demand_queue)
                for exchange in self._topology.exchanges(self._models):
                    await channel.exchange_delete(exchange.name)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot delete the topology: {exc!r}") from exc

    async def purge(self, queue_name: str) -> None:
        """Drop every ready message of a queue (benchmarks, between phases)."""
        if self._publish_connection is None:
            raise BrokerUnavailable("not connected")
        try:
            async with self._publish_connection.channel() as channel:
                queue = await channel.get_queue(queue_name, ensure=False)
                await queue.purge()
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot purge {queue_name}: {exc!r}") from exc

    async def queue_depth(self, queue_name: str, timeout_s: float = 5.0) -> tuple[int, int]:
        """(ready messages, consumers) of a queue, via a passive declare, within `timeout_s`
        (a stalled connection must not hold an admission, and an Idempotency-Key's lease)."""
        try:
            async with asyncio.timeout(timeout_s):
                channel = await self._open_inspect_channel()
                # The bare AMQP method: aio_pika's robust channel answers a passive declare
                # it has seen before from its cache, with the depth of that first read.
                underlay = await channel.get_underlay_channel()
                result = await underlay.queue_declare(queue_name, passive=True)
        except _CHANNEL_ERRORS as exc:
            raise BrokerUnavailable(f"cannot inspect {queue_name}: {exc!r}") from exc
        return result.message_count or 0, result.consumer_count or 0

    async def _open_inspect_channel(self) -> aio_pika.abc.AbstractChannel:
        """The depth-reading channel, opened again when a read closed it (a missing queue
        answers 404 and closes its channel) or its connection was replaced."""
        channel = self._inspect_channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._inspect_lock:
            channel = self._inspect_channel
            if channel is None or channel.is_closed:
                if self._consume_connection is None:
                    raise BrokerUnavailable("not connected")
                channel = self._inspect_channel = await self._consume_connection.channel()
            return channel


# aiormq keeps connection.blocked / connection.unblocked in this event and offers no public
# accessor; reading it is the only way to refuse a publish the broker would not read.
_UNBLOCKED_ATTRIBUTE = "_Connection__connection_unblocked"


def _mismatch(spec: QueueSpec, exc: Exception) -> TopologyMismatch:
    return TopologyMismatch(
        f"queue {spec.name} exists with other arguments than {spec.arguments} ({exc}); an older "
        "version or another setting declared it: drain and delete it, or set another QUEUE_PREFIX"
    )


def _blocked_event(connection: aio_pika.abc.AbstractRobustConnection) -> asyncio.Event | None:
    """The event set when the broker unblocks the connection, while it is blocked; else None."""
    transport = getattr(connection, "transport", None)
    unblocked = getattr(getattr(transport, "connection", None), _UNBLOCKED_ATTRIBUTE, None)
    if isinstance(unblocked, asyncio.Event) and not unblocked.is_set():
        return unblocked
    return None


async def _closed_within_bound(
    closable: aio_pika.abc.AbstractChannel | aio_pika.abc.AbstractRobustConnection,
) -> None:
    """Close a channel or connection, giving up after SHUTDOWN_RPC_TIMEOUT_S or on an error:
    the broker hands back what a channel held once it sees the socket go."""
    with contextlib.suppress(*_CONNECTION_ERRORS):
        async with asyncio.timeout(SHUTDOWN_RPC_TIMEOUT_S):
            await closable.close()
