"""Classic job queues of version 2 (a job's publish confirmed sooner), and job queues an
older version declared as version 1 still used, with the jobs they hold, after an upgrade."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import aio_pika
import aiormq
import pytest

from broker.client import Broker, Delivery
from settings.environment import ConfigError, Environment
from tests.conftest import wait_until
from wire.outgoing import OutgoingMessage
from wire.topology import QUEUE_VERSION_ARGUMENT, Topology


async def _declared_with(amqp_url: str, queue: str, arguments: dict[str, Any]) -> bool:
    """Whether the broker holds `queue` with exactly these arguments: an equivalent
    declaration passes, any other is refused with PRECONDITION_FAILED."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        return True


async def _publish_and_take(broker: Broker, topology: Topology, body: bytes) -> list[bytes]:
    """Publish one job message (confirmed) and take what the normal queue delivers until it
    has arrived: the queue's older jobs come first."""
    received: list[bytes] = []

    async def take(delivery: Delivery) -> None:
        received.append(delivery.body)
        await delivery.ack()

    await broker.publish(
        OutgoingMessage(body, message_id=body.decode()),
        topology.job_routing_key("echo", "normal"),
        exchange=topology.jobs_exchange,
    )
    consumer = await broker.consume(topology.job_queue("echo", "normal"), 8, take)
    try:
        await wait_until(lambda: body in received, 10, f"{body!r} delivered")
    finally:
        await broker.cancel(consumer)
    return received


async def test_given_a_fresh_broker_then_job_queues_are_version_2_and_the_others_are_not(
    amqp_url: str, topology: Topology
) -> None:
    broker = Broker(amqp_url, topology, ("echo",))
    await broker.connect()
    try:
        assert await _publish_and_take(broker, topology, b"job-1") == [b"job-1"]
    finally:
        await broker.close()
    for spec in topology.queues(("echo",)):
        is_job_queue = spec.name in topology.job_queues("echo") + topology.chunk_queues("echo")
        assert (QUEUE_VERSION_ARGUMENT in spec.arguments) == is_job_queue, spec.name
        assert await _declared_with(amqp_url, spec.name, spec.arguments), spec.name
    normal = topology.job_queue("echo", "normal")
    version_2 = next(spec.arguments for spec in topology.queues(("echo",)) if spec.name == normal)
    without = {k: v for k, v in version_2.items() if k != QUEUE_VERSION_ARGUMENT}
    assert not await _declared_with(amqp_url, normal, without)


async def test_given_job_queues_an_older_version_declared_then_the_upgrade_uses_them_and_their_jobs(
    amqp_url: str, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    older = dataclasses.replace(topology, classic_queue_version=1)
    before = Broker(amqp_url, older, ("echo",))
    await before.connect()
    try:
        await before.publish(
            OutgoingMessage(b"queued-before", message_id="queued-before"),
            older.job_routing_key("echo", "normal"),
            exchange=older.jobs_exchange,
        )
    finally:
        await before.close()
    normal = topology.job_queue("echo", "normal")
    upgraded = Broker(amqp_url, topology, ("echo",))
    with caplog.at_level(logging.WARNING, logger="broker.client"):
        await upgraded.connect()
    try:
        assert upgraded.is_ready
        assert await _publish_and_take(upgraded, topology, b"queued-after") == [
            b"queued-before",
            b"queued-after",
        ]
    finally:
        await upgraded.close()
    assert f"queue {normal} was declared without x-queue-version" in caplog.text
    version_1 = next(spec.arguments for spec in older.queues(("echo",)) if spec.name == normal)
    assert await _declared_with(amqp_url, normal, version_1)


def test_given_classic_queue_version_1_then_no_queue_carries_the_argument() -> None:
    topology = Environment.read({"CLASSIC_QUEUE_VERSION": "1"}).topology()
    assert topology.classic_queue_version == 1
    assert all(QUEUE_VERSION_ARGUMENT not in spec.arguments for spec in topology.queues(("echo",)))


@pytest.mark.parametrize("value", ["0", "3", "two"])
def test_given_an_unknown_classic_queue_version_then_the_setting_is_refused_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match="CLASSIC_QUEUE_VERSION"):
        Environment.read({"CLASSIC_QUEUE_VERSION": value})
