"""The one place a consumed delivery is settled: the job worker, the callback dispatcher
and the parking lot's replay all end a delivery here.

The contract, for each (delivery, publishes) pair handed to `settle`:

1. Every message in `publishes` is published persistently and waits for its publisher
   confirm; a delivery's own messages go in order, different deliveries' messages are
   pipelined (one confirm wait for all of them).
2. With a `combine` function, messages that carry a `combine_key` (callback events) are
   published after the delivery's others, together with the other deliveries' messages
   for the same exchange, routing key and key: `combine` makes one message of up to
   COMBINE_MAX_MESSAGES of them (COMBINE_MAX_BYTES of body). A delivery then depends on
   every combined message that carries one of its own.
3. Only a delivery whose messages were all confirmed is acked (one `basic.ack multiple`
   per channel where that acks exactly those deliveries; see `ack_all`).
4. A delivery whose publish was refused (nack, unroutable) or timed out while its
   channel is still open is nacked with requeue at once: it runs again from its queue
   and is never left unacked on a live channel. On a closed channel there is nothing to
   do: the broker has already handed it back.

So an outcome is never acked before it is durable, and never lost: at worst it is
published and then redelivered (at-least-once; callbacks carry a stable webhook-id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.client import Broker, BrokerError, Delivery, ack_all
from wire.outgoing import Publish

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    """How a call to `settle` ended: deliveries acked, requeued, and left to the broker
    (their channel closed, or the ack could not be sent: the broker redelivers them)."""

    acked: int
    requeued: int
    redelivered: int


Outcome = tuple[Delivery, Sequence[Publish]]
# Several messages of one (exchange, routing key, combine key) as one message.
Combine = Callable[[Sequence[Publish]], Publish]

COMBINE_MAX_MESSAGES = 64
COMBINE_MAX_BYTES = 64 * 1024


async def settle(broker: Broker, outcomes: Sequence[Outcome], combine: Combine | None = None) -> Settled:
    """Make each delivery's outcome durable, then ack it; requeue those that could not be."""
    own = [
        publishes if combine is None else [p for p in publishes if p.combine_key is None]
        for _, publishes in outcomes
    ]
    errors: list[BrokerError | None] = [None] * len(outcomes)
    publishing = [index for index, publishes in enumerate(own) if publishes]
    results = await asyncio.gather(*(_publish_in_order(broker, own[index]) for index in publishing))
    for index, error in zip(publishing, results, strict=True):
        errors[index] = error
    if combine is not None:
        shared = [[p for p in publishes if p.combine_key is not None] for _, publishes in outcomes]
        await _publish_combined(broker, shared, errors, combine)
    durable: list[Delivery] = []
    requeued = redelivered = 0
    for (delivery, _), error in zip(outcomes, errors, strict=True):
        if error is None:
            durable.append(delivery)
            continue
        logger.warning("%s goes back to its queue, not settled: %s", delivery.message_id, error)
        try:
            await delivery.requeue()
            requeued += 1
        except BrokerError:
            redelivered += 1  # its channel is gone: the broker has already taken it back
    try:
        await ack_all(durable)
    except BrokerError as exc:
        logger.warning("acks of %d deliveries failed; they will be redelivered: %s", len(durable), exc)
        return Settled(acked=0, requeued=requeued, redelivered=redelivered + len(durable))
    return Settled(acked=len(durable), requeued=requeued, redelivered=redelivered)


async def _publish_combined(
    broker: Broker, shared: list[list[Publish]], errors: list[BrokerError | None], combine: Combine
) -> None:
    """Publish the combinable messages of the deliveries whose own went through, combined;
    a combined message that fails fails every delivery it carries (in `errors`)."""
    groups: dict[tuple[str, str, str | None], list[tuple[int, Publish]]] = {}
    for index, publishes in enumerate(shared):
        if errors[index] is None:
            for publish in publishes:
                key = (publish.exchange, publish.routing_key, publish.combine_key)
                groups.setdefault(key, []).append((index, publish))
    chunks = [chunk for members in groups.values() for chunk in _chunks(members)]
    results = await asyncio.gather(
        *(_publish_in_order(broker, [combine([p for _, p in chunk])]) for chunk in chunks)
    )
    for chunk, error in zip(chunks, results, strict=True):
        if error is not None:
            for index, _ in chunk:
                errors[index] = error


def _chunks(members: list[tuple[int, Publish]]) -> list[list[tuple[int, Publish]]]:
    """Runs of at most COMBINE_MAX_MESSAGES messages and COMBINE_MAX_BYTES of body (a
    larger message goes alone)."""
    chunks: list[list[tuple[int, Publish]]] = []
    size_bytes = 0
    for member in members:
        body_bytes = len(member[1].message.body)
        full = len(chunks[-1]) >= COMBINE_MAX_MESSAGES if chunks else True
        if full or size_bytes + body_bytes > COMBINE_MAX_BYTES:
            chunks.append([])
            size_bytes = 0
        chunks[-1].append(member)
        size_bytes += body_bytes
    return chunks


async def _publish_in_order(broker: Broker, publishes: Sequence[Publish]) -> BrokerError | None:
    try:
        for publish in publishes:
            await broker.publish(publish.message, publish.routing_key, exchange=publish.exchange)
    except BrokerError as exc:
        return exc
    return None
