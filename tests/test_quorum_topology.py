"""The quorum topology (QUEUE_TYPE=quorum) on the real broker: three priority queues per
model, delay tiers per priority, a delivery limit that parks a job its consumers keep
dropping, at-least-once dead-lettering, and a worker that serves high priority first.

This module's `topology` fixture is the quorum one, so the conftest's ingress, worker
and dispatcher fixtures all run on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aio_pika
import httpx
import pytest

from broker.client import Broker, Delivery, TopologyMismatch
from broker_access.roles import roles
from callbacks.dispatcher import CallbackDispatcher
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.priority_inbox import PriorityInbox
from ray_workers.settings import WorkerSettings
from tests.conftest import TEST_MODELS, fresh_topology, queue_holds, running_worker, wait_until
from wire.envelope import AMQP_PRIORITY, Job
from wire.job_message import job_message
from wire.topology import DELIVERY_LIMIT, Topology


@pytest.fixture
async def topology(amqp_url: str, redis_url: str) -> AsyncIterator[Topology]:
    async with fresh_topology(amqp_url, redis_url, "quorum") as topo:
        yield topo


def test_each_priority_has_its_queue_and_tiers_and_every_dead_letter_is_at_least_once() -> None:
    topo = Topology(prefix="p.", queue_type="quorum", tenant_lanes=1)
    specs = {spec.name: spec for spec in topo.queues(("echo",))}

    assert topo.job_queues("echo") == ("p.jobs.echo.high", "p.jobs.echo.normal", "p.jobs.echo.low")
    high = specs["p.jobs.echo.high"]
    assert high.bindings == (("p.jobs", "echo.high"),)
    assert high.arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "p.job-outcomes.echo",
        "x-dead-letter-routing-key": "p.jobs.echo.parked",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    tier = specs[topo.job_retry_queue("echo", 1.0, "low")]
    assert tier.name == "p.jobs.echo.retry.1s.low"
    assert tier.arguments["x-dead-letter-routing-key"] == "echo.low"  # back to its own priority
    assert tier.arguments["x-dead-letter-strategy"] == "at-least-once"
    assert all(spec.arguments["x-queue-type"] == "quorum" for spec in specs.values())
    assert not any("x-max-priority" in spec.arguments for spec in specs.values())
    worker = next(role for role in roles(topo, ("echo",)) if role.name == "worker-echo")
    assert [bool(re.search(worker.read, q)) for q in (*topo.job_queues("echo"), "p.jobs.echo.parked")] == [
        True,
        True,
        True,
        False,
    ]
    classic = Topology(prefix="p.", tenant_lanes=1)
    assert classic.job_queues("echo") == ("p.jobs.echo.high", "p.jobs.echo")
    assert classic.job_routing_key("echo", "high") == "echo.high"
    assert classic.job_routing_key("echo", "low") == "echo"


def test_the_inbox_serves_high_before_normal_before_low_and_arrivals_in_order() -> None:
    inbox = PriorityInbox()
    arrivals = [("low", 1), ("normal", 2), ("high", 3), ("low", 4), ("high", 5)]
    for priority, n in arrivals:
        inbox.put_nowait(cast(Delivery, _Prefetched(AMQP_PRIORITY[priority], n)))

    served = [cast(_Prefetched, inbox.get_nowait()).n for _ in arrivals]

    assert served == [3, 5, 2, 1, 4]


@dataclasses.dataclass(frozen=True)
class _Prefetched:
    priority: int
    n: int
    headers: Mapping[str, Any] = dataclasses.field(default_factory=dict)


async def test_given_quorum_queues_then_jobs_retries_parking_and_callbacks_flow(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    amqp_url: str,
    topology: Topology,
) -> None:
    jobs = [
        ("echo", {"hello": 1}, "low"),
        ("synthetic", {"fail_until_attempt": 2}, "high"),
        ("synthetic", {"fail_permanently": True}, "normal"),
    ]
    async with (
        running_worker(EchoModel(), worker_settings),
        running_worker(SyntheticModel(), worker_settings),
    ):
        for model, job_input, priority in jobs:
            body = {"input": job_input, "callback_url": receiver.url, "priority": priority}
            response = await client.post(f"/v1/models/{model}/jobs", json=body)
            assert response.status_code == 202, response.text
        received = await receiver.wait_for(3, timeout_s=20)

    by_type = sorted((r.event["type"], r.event["data"]["attempts"]) for r in received)
    assert by_type == [("job.failed", 1), ("job.succeeded", 1), ("job.succeeded", 2)]
    assert all(r.verified for r in received)
    await wait_until(
        lambda: queue_holds(amqp_url, topology.parking_queue("synthetic"), 1), 10, "the parked job"
    )


async def test_given_a_prefetched_low_priority_backlog_then_a_new_high_priority_job_runs_next(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    """The replica holds the whole low backlog (a quorum consumer prefetches twice the
    largest batch); a high job that arrives later still goes into the next batch."""
    lows = 60
    for _ in range(lows):
        await _submit(client, {"sleep_ms": 30}, receiver.url, "low")
    async with running_worker(SyntheticModel(), worker_settings):
        await receiver.wait_for(3, timeout_s=15)
        high = await _submit(client, {"sleep_ms": 30}, receiver.url, "high")
        received = await receiver.wait_for(lows + 1, timeout_s=30)

    # A batch's jobs share their model time and batch size; batches settle in order.
    batches: dict[tuple[float, int], list[str]] = {}
    first_seen: dict[tuple[float, int], float] = {}
    for r in received:
        timings = r.event["data"]["timings"]
        key = (timings["inference_ms"], timings["batch_size"])
        batches.setdefault(key, []).append(r.event["data"]["id"])
        first_seen.setdefault(key, r.received_monotonic_s)
    ordered = sorted(batches, key=first_seen.__getitem__)
    high_batch = next(i for i, key in enumerate(ordered) if high in batches[key])
    lows_after = sum(len(batches[key]) for key in ordered[high_batch + 1 :])
    assert lows_after >= 20, [len(batches[key]) for key in ordered]  # served in arrival order: 0


async def test_a_job_its_consumers_keep_dropping_is_parked_at_the_delivery_limit(
    broker: Broker, amqp_url: str, topology: Topology
) -> None:
    job = Job(id="poison-1", model="echo", input="x", priority="normal", submitted_at_ms=1)
    await broker.publish(
        job_message(job), topology.job_routing_key("echo", "normal"), exchange=topology.jobs_exchange
    )
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.job_queue("echo", "normal"), passive=True)
        for _ in range(DELIVERY_LIMIT + 1):  # each a consumer that died holding it
            message = await _get(queue)
            await message.nack(requeue=True)

    await wait_until(lambda: queue_holds(amqp_url, topology.parking_queue("echo"), 1), 10, "parked")
    assert await queue_holds(amqp_url, topology.job_queue("echo", "normal"), 0)


async def test_declaring_the_other_queue_type_over_a_topology_fails_loudly(
    broker: Broker, amqp_url: str, topology: Topology
) -> None:
    classic = Broker(amqp_url, dataclasses.replace(topology, queue_type="classic"), TEST_MODELS)

    with pytest.raises(TopologyMismatch, match="exists with other arguments"):
        await classic.connect()


async def _submit(client: httpx.AsyncClient, job_input: Any, url: str, priority: str) -> str:
    body = {"input": job_input, "callback_url": url, "priority": priority}
    response = await client.post("/v1/models/synthetic/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _get(queue: aio_pika.abc.AbstractQueue) -> aio_pika.abc.AbstractIncomingMessage:
    for _ in range(100):
        message = await queue.get(fail=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing to get from {queue.name}")
