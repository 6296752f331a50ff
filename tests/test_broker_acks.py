"""`ack_all`: one `basic.ack multiple` only where it acks exactly the given deliveries.
Real broker: what is not acked comes back when the channel closes."""

from __future__ import annotations

import asyncio

from broker.client import Broker, Delivery, ack_all
from tests.conftest import wait_until
from wire.outgoing import OutgoingMessage


async def _consume_five(broker: Broker, queue: str) -> tuple[str, list[Delivery]]:
    for n in range(5):
        await broker.publish(OutgoingMessage(str(n).encode(), message_id=f"m{n}"), queue)
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = await broker.consume(queue, 10, inbox.put)
    await wait_until(lambda: inbox.qsize() == 5, 10, "five deliveries")
    return consumer, [inbox.get_nowait() for _ in range(5)]


async def test_given_an_earlier_delivery_still_unsettled_then_ack_all_does_not_ack_it(
    broker: Broker,
) -> None:
    queue = broker.topology.callbacks_parking_queue
    consumer, deliveries = await _consume_five(broker, queue)

    await ack_all(deliveries[1:])  # the first stays unsettled: a multiple ack would take it too
    await broker.cancel(consumer, close_channel=True)

    await wait_until(lambda: _ready(broker, queue, 1), 10, "the unsettled delivery back in its queue")
    ready, _ = await broker.queue_depth(queue)
    assert ready == 1


async def test_given_every_delivery_of_the_channel_then_ack_all_settles_them_all(broker: Broker) -> None:
    queue = broker.topology.callbacks_parking_queue
    consumer, deliveries = await _consume_five(broker, queue)

    await ack_all(list(reversed(deliveries)))
    await broker.cancel(consumer, close_channel=True)

    ready, _ = await broker.queue_depth(queue)
    assert ready == 0


async def _ready(broker: Broker, queue: str, count: int) -> bool:
    ready, _ = await broker.queue_depth(queue)
    return ready == count
