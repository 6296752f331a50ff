"""Parking lots: inspection and replay keep what they do not move (budgets issue, review
items 2 and 11). Real broker and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import httpx
import pytest

from autoscaler.queue_metrics import management_url_from_amqp
from broker.client import Broker
from job_records.store import JobRecords
from parking_lot.lots import ParkingLot, inspect, replay
from tests.conftest import TEST_MODELS, drain_queue, fresh_topology, queue_holds
from wire.envelope import PARK_REASON_HEADER, Job
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage
from wire.topology import Topology


def _job() -> Job:
    return Job(id=str(uuid.uuid4()), model="echo", input=1, submitted_at_ms=int(time.time() * 1000))


async def _park(broker: Broker, lot: ParkingLot, job: Job) -> None:
    message = job_message(job, {PARK_REASON_HEADER: "permanent error"})
    await broker.publish(message, lot.queue, exchange=lot.exchange)


@pytest.fixture
async def quorum_broker(amqp_url: str, redis_url: str) -> AsyncIterator[Broker]:
    """The quorum topology, its parking lots under a policy with a delivery limit of 2: what
    RabbitMQ 4.x does to every quorum queue by default (a limit of 20)."""
    async with fresh_topology(amqp_url, redis_url, "quorum") as topology:
        management = urlsplit(management_url_from_amqp(amqp_url).split(",")[0])
        base = f"{management.scheme}://{management.hostname}:{management.port}"
        auth = (management.username or "guest", management.password or "guest")
        policy = f"/api/policies/%2F/{quote(topology.prefix, safe='')}delivery-limit"
        async with httpx.AsyncClient(base_url=base, auth=auth) as api:
            answer = await api.put(
                policy,
                json={
                    "pattern": f"^{topology.prefix.replace('.', '[.]')}.*parked$",
                    "definition": {"delivery-limit": 2},
                    "apply-to": "queues",
                    "priority": 100,
                },
            )
            assert answer.status_code in (201, 204), answer.text
            broker = Broker(amqp_url, topology, TEST_MODELS)
            await broker.connect()
            try:
                yield broker
            finally:
                await broker.close()
                await api.delete(policy)


async def test_given_a_delivery_limit_then_inspecting_a_parking_lot_many_times_keeps_every_message(
    quorum_broker: Broker,
) -> None:
    """Item 2: inspection handed every message back, a delivery each; past the limit a quorum
    queue without a dead-letter target drops it (4.x: 20 inspections emptied the lot)."""
    lot = ParkingLot(quorum_broker.topology, "echo")
    jobs = [_job() for _ in range(3)]
    for job in jobs:
        await _park(quorum_broker, lot, job)

    reports = [await inspect(quorum_broker, lot) for _ in range(6)]

    assert [report.count for report in reports] == [3] * 6
    assert [message_id for message_id, _ in reports[-1].sample] == [job.id for job in jobs]  # order kept


async def test_given_a_delivery_limit_then_replaying_one_id_keeps_the_others_parked(
    quorum_broker: Broker, amqp_url: str
) -> None:
    lot = ParkingLot(quorum_broker.topology, "echo")
    jobs = [_job() for _ in range(3)]
    for job in jobs:
        await _park(quorum_broker, lot, job)

    for job in jobs:
        assert (await replay(quorum_broker, lot, ids=[job.id])).moved == 1

    queued = [m for q in quorum_broker.topology.job_queues("echo") for m in await drain_queue(amqp_url, q)]
    assert sorted(m.message_id or "" for m in queued) == sorted(job.id for job in jobs)


async def test_given_two_parked_copies_and_a_job_since_succeeded_then_one_copy_of_the_failed_one_is_replayed(
    broker: Broker, topology: Topology, redis_url: str, amqp_url: str
) -> None:
    """Item 11: both copies of one job were replayed (two runs, maybe two endings), and a
    parked copy of a job that had succeeded since was reopened and run again."""
    lot = ParkingLot(topology, "echo")
    failed, succeeded = _job(), _job()
    records = JobRecords(redis_url, topology.prefix, ttl_s=60)
    try:
        await records.create([failed, succeeded])
        await records.finish(
            [(failed, "failed", 3, None, "model is down"), (succeeded, "succeeded", 2, "ok", None)]
        )
        for job in (failed, failed, succeeded):
            await _park(broker, lot, job)

        result = await replay(broker, lot, records=records)
        reopened = await records.get(failed.id)
        kept_done = await records.get(succeeded.id)
    finally:
        await records.close()

    assert result.moved == 1
    assert sorted(message_id for message_id, _ in result.kept) == sorted([failed.id, succeeded.id])
    assert reopened is not None and reopened.status == "queued"
    assert kept_done is not None and kept_done.status == "succeeded" and kept_done.output == "ok"
    assert await queue_holds(amqp_url, topology.main_queue("echo"), 1)
    assert await queue_holds(amqp_url, lot.queue, 2)


async def test_a_callback_parking_lot_inspected_keeps_its_message_types(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    lot = ParkingLot(topology, None)
    headers = {PARK_REASON_HEADER: "receiver answered 410"}
    message = OutgoingMessage(b'{"x": 1}', "msg_1", headers=headers, type="job.succeeded")
    await broker.publish(message, lot.queue, exchange=lot.exchange)

    assert (await inspect(broker, lot)).reasons == {"receiver answered 410": 1}
    [kept] = await drain_queue(amqp_url, lot.queue)
    assert (kept.type, kept.body) == ("job.succeeded", b'{"x": 1}')
