"""The one place a consumed delivery is settled: the job worker, the callback dispatcher
and the parking lot's replay all end a delivery here.

The contract, for each (delivery, publishes) pair handed to `settle`:

1. Every message in `publishes` is published persistently and waits for its publisher
   confirm; a delivery's own messages go in order, different deliveries' messages are
   pipelined (one confirm wait for all of them).
2. Only a delivery whose messages were all confirmed is acked (one `basic.ack multiple`
   per channel where that acks exactly those deliveries; see `ack_all`).
3. A delivery whose publish was refused (nack, unroutable) or timed out while its
   channel is still open is nacked with requeue at once: it runs again from its queue
   and is never left unacked on a live channel. On a closed channel there is nothing to
   do: the broker has already handed it back.

So an outcome is never acked before it is durable, and never lost: at worst it is
published and then redelivered (at-least-once; callbacks carry a stable webhook-id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from contract.broker import Broker, BrokerError, Delivery, OutgoingMessage, ack_all

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Publish:
    """One message to publish: to `routing_key` on `exchange` ("" is the default exchange)."""

    message: OutgoingMessage
    routing_key: str
    exchange: str = ""


@dataclass(frozen=True)
class Settled:
    """How a call to `settle` ended: deliveries acked, requeued, and left to the broker
    (their channel closed, or the ack could not be sent: the broker redelivers them)."""

    acked: int
    requeued: int
    redelivered: int


Outcome = tuple[Delivery, Sequence[Publish]]


async def settle(broker: Broker, outcomes: Sequence[Outcome]) -> Settled:
    """Make each delivery's outcome durable, then ack it; requeue those that could not be."""
    errors = await asyncio.gather(*(_publish_in_order(broker, publishes) for _, publishes in outcomes))
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


async def _publish_in_order(broker: Broker, publishes: Sequence[Publish]) -> BrokerError | None:
    try:
        for publish in publishes:
            await broker.publish(publish.message, publish.routing_key, exchange=publish.exchange)
    except BrokerError as exc:
        return exc
    return None
