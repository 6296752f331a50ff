"""The queue-depth reader over the management API (what the local autoscaler polls), given
a cluster's nodes: a dead node is passed over for one that answers, and only when none
answers is the read a failure. Real management API (the broker's), a dead port beside it."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from autoscaler.queue_metrics import ManagementApi, QueueMetricUnavailable, management_url_from_amqp
from tests.conftest import wait_until

DEAD_NODE = "http://guest:guest@127.0.0.1:1"


async def test_given_a_dead_node_first_then_the_depth_is_read_from_the_next(amqp_url: str) -> None:
    queue_name = f"t{uuid.uuid4().hex[:10]}.depth"
    live = management_url_from_amqp(amqp_url)
    api = ManagementApi(f"{DEAD_NODE},{live}", "/", timeout_s=2.0)
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        for n in range(3):
            await channel.default_exchange.publish(aio_pika.Message(str(n).encode()), queue_name)
        try:
            # The management API refreshes its figures every 5 s.
            await wait_until(lambda: _depth_is(api, queue_name, 3), 15, "the depth through the live node")
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await api.close()


async def _depth_is(api: ManagementApi, queue: str, expected: float) -> bool:
    return await api.queue_messages(queue) == expected


async def test_given_no_node_answers_then_the_read_fails_naming_each() -> None:
    api = ManagementApi(f"{DEAD_NODE},http://guest:guest@127.0.0.1:2", "/", timeout_s=1.0)
    try:
        with pytest.raises(QueueMetricUnavailable) as failed:
            await api.queue_messages("anything")
    finally:
        await api.close()

    assert "127.0.0.1:1" in str(failed.value) and "127.0.0.1:2" in str(failed.value)
    assert "guest:guest" not in str(failed.value)


def test_each_node_of_amqp_url_has_its_management_url() -> None:
    urls = "amqp://u:p@rabbit-0.svc:5672/%2F,amqp://u:p@rabbit-1.svc:5672/%2F"
    assert management_url_from_amqp(urls) == "http://u:p@rabbit-0.svc:15672,http://u:p@rabbit-1.svc:15672"
