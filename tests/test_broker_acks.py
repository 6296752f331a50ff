"""`ack_all`: one `basic.ack multiple` only where it acks exactly the given deliveries; and
depth reads. Real broker: what is not acked comes back when the channel closes."""

from __future__ import annotations

import asyncio

import pytest

from broker.client import Broker, BrokerUnavailable, Delivery, ack_all
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


async def test_given_depth_reads_on_one_channel_then_each_sees_the_queue_now_and_a_missing_queue_harms_none(
    broker: Broker,
) -> None:
    """Depth reads share a channel: none may answer from an earlier read, and the 404 that
    closes the channel on a missing queue must not fail the reads after it."""
    queue = broker.topology.callbacks_parking_queue
    assert (await broker.queue_depth(queue))[0] == 0
    await broker.publish(OutgoingMessage(b"x", message_id="m"), queue)
    await wait_until(lambda: _ready(broker, queue, 1), 10, "the message counted")

    with pytest.raises(BrokerUnavailable, match="cannot inspect"):
        await broker.queue_depth(f"{queue}.missing")
    depths = await asyncio.gather(*(broker.queue_depth(queue) for _ in range(8)))
    assert [ready for ready, _ in depths] == [1] * 8


async def test_given_consumers_cancelled_while_starting_then_none_lives_on_and_the_connection_stays(
    broker: Broker,
) -> None:
    """A consume cancelled part-way (a worker stopping while it resumes) left, once in a
    few dozen tries, a consumer the broker had started but nobody tracked, taking jobs
    nobody would settle. Cancelled at every point of its start, none may live on."""
    queue = broker.topology.callbacks_parking_queue
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    started = 0
    for step in range(120):
        starting = asyncio.create_task(broker.consume(queue, 10, inbox.put))
        await asyncio.sleep(step * 0.00002)
        starting.cancel()
        try:
            await starting
            started += 1  # it finished before the cancel landed: a consumer of ours
        except asyncio.CancelledError:
            pass
    assert 0 < started < 120, "the cancels missed the start altogether: the test says nothing"

    async def only_ours() -> bool:
        _, consumers = await broker.queue_depth(queue)
        return consumers == started

    await wait_until(only_ours, 10, f"{started} consumers on the queue, the ones consume() returned")
    assert broker.is_ready
