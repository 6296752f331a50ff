"""Single jobs grouped under load (`ingress.single_job_groups`), against the real broker,
Redis and HTTP: past CHUNK_JOBS publishes at once the next CHUNK_JOBS jobs go as one
chunk; below that, and for a group that does not fill in time, each job goes alone; a
chunk's failure is each of its jobs'; every job is queued once and calls back once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import httpx
import pytest

from broker.client import Broker, PublishRejected
from callbacks.dispatcher import CallbackDispatcher
from ingress.app import create_app
from ingress.settings import IngressSettings
from ingress.single_job_groups import GROUP_HOLD_S, GROUPED_MAX_BYTES, HowSent, SingleJobPublisher
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tests.conftest import drain_queue, jobs_held, queue_holds, running_worker, wait_until
from wire.envelope import Job
from wire.job_chunk import CHUNK_JOBS, CHUNK_TYPE, chunked_jobs
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage
from wire.topology import Topology

MODEL = "echo"


def _messages(count: int, input_bytes: int = 0) -> list[OutgoingMessage]:
    now_ms = int(time.time() * 1000)
    return [
        job_message(
            Job(id=str(uuid.uuid4()), model=MODEL, input="x" * input_bytes or n, submitted_at_ms=now_ms)
        )
        for n in range(count)
    ]


def _publisher(broker: Broker, topology: Topology, hold_s: float = GROUP_HOLD_S) -> SingleJobPublisher:
    return SingleJobPublisher(broker, topology.jobs_exchange, timeout_s=10.0, hold_s=hold_s)


async def _publish_at_once(
    publisher: SingleJobPublisher, topology: Topology, messages: list[OutgoingMessage], chunk_key: str = ""
) -> list[HowSent | BaseException]:
    key = topology.job_routing_key(MODEL, "normal")
    chunk_key = chunk_key or topology.chunk_routing_key(MODEL, "normal")
    return list(
        await asyncio.gather(
            *(publisher.publish(m, key, chunk_key) for m in messages), return_exceptions=True
        )
    )


async def _queued_ids(amqp_url: str, topology: Topology) -> tuple[list[str], int]:
    """Every job id waiting in the model's normal queue and its chunk queue, and how many
    chunk messages there were."""
    alone = await drain_queue(amqp_url, topology.job_queue(MODEL, "normal"))
    chunks = await drain_queue(amqp_url, topology.chunk_queue(MODEL, "normal"))
    assert all(c.type == CHUNK_TYPE for c in chunks)
    ids = [m.message_id or "" for m in alone]
    ids += [job.message_id for c in chunks for job in chunked_jobs(c.body)]
    return ids, len(chunks)


async def test_given_more_than_a_chunk_of_jobs_published_at_once_then_the_next_chunk_goes_as_one_message(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    messages = _messages(2 * CHUNK_JOBS)

    results = await _publish_at_once(_publisher(broker, topology), topology, messages)
    held = await jobs_held(amqp_url, topology, MODEL)
    one_chunk = await queue_holds(amqp_url, topology.chunk_queue(MODEL, "normal"), 1)
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert results == ["alone"] * CHUNK_JOBS + ["in-a-chunk"] * CHUNK_JOBS
    assert one_chunk and chunks == 1
    assert held == len(messages)
    assert Counter(ids) == Counter(m.message_id for m in messages)  # each job queued once


async def test_given_jobs_one_at_a_time_then_each_goes_alone_at_once(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    publisher = _publisher(broker, topology, hold_s=60.0)  # a job held would time the test out
    messages = _messages(CHUNK_JOBS + 8)

    results = [await _publish_at_once(publisher, topology, [message]) for message in messages]
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert results == [["alone"]] * len(messages)
    assert chunks == 0
    assert ids == [m.message_id for m in messages]


async def test_given_a_group_that_does_not_fill_then_its_jobs_go_alone_after_the_hold(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    hold_s = 0.3
    messages = _messages(CHUNK_JOBS + 5)

    started = time.monotonic()
    results = await _publish_at_once(_publisher(broker, topology, hold_s), topology, messages)
    took_s = time.monotonic() - started
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert results == ["alone"] * CHUNK_JOBS + ["alone-after-hold"] * 5
    assert took_s >= hold_s  # the last five waited for their group, then went alone
    assert chunks == 0
    assert Counter(ids) == Counter(m.message_id for m in messages)


async def test_given_large_jobs_then_none_is_grouped(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    messages = _messages(2 * CHUNK_JOBS, input_bytes=GROUPED_MAX_BYTES)

    results = await _publish_at_once(_publisher(broker, topology, hold_s=60.0), topology, messages)
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert results == ["alone"] * len(messages)
    assert chunks == 0
    assert Counter(ids) == Counter(m.message_id for m in messages)


async def test_given_the_chunk_is_not_taken_then_each_of_its_jobs_fails_and_the_others_are_queued(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    messages = _messages(2 * CHUNK_JOBS)

    # No queue is bound to this key: the broker returns the chunk (mandatory publish).
    results = await _publish_at_once(
        _publisher(broker, topology), topology, messages, chunk_key=f"nowhere-{uuid.uuid4().hex}"
    )
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert results[:CHUNK_JOBS] == ["alone"] * CHUNK_JOBS
    assert all(isinstance(r, PublishRejected) for r in results[CHUNK_JOBS:])
    assert chunks == 0
    assert ids == [m.message_id for m in messages[:CHUNK_JOBS]]


async def test_given_a_held_job_whose_request_ends_then_it_leaves_its_group_unsent(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    publisher = _publisher(broker, topology, hold_s=0.3)
    messages = _messages(CHUNK_JOBS + 5)
    key, chunk_key = topology.job_routing_key(MODEL, "normal"), topology.chunk_routing_key(MODEL, "normal")
    tasks = [asyncio.create_task(publisher.publish(m, key, chunk_key)) for m in messages]
    await asyncio.sleep(0)  # every publish has started: the last five wait in a group

    tasks[-1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ids, chunks = await _queued_ids(amqp_url, topology)

    assert isinstance(results[-1], asyncio.CancelledError)
    assert results[:-1] == ["alone"] * CHUNK_JOBS + ["alone-after-hold"] * 4
    assert chunks == 0
    assert Counter(ids) == Counter(m.message_id for m in messages[:-1])


@pytest.mark.parametrize("with_key", [False, True], ids=["unkeyed", "idempotency-keyed"])
async def test_given_single_requests_grouped_then_each_job_is_queued_once_and_calls_back_once(
    ingress_settings: IngressSettings,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    topology: Topology,
    amqp_url: str,
    with_key: bool,
) -> None:
    """Every job grouped (past 0 publishes, not CHUNK_JOBS: in one process the requests do
    not pile up at the publish as a backlog's do): two chunks, and three jobs alone once
    their group's hold is over (2 s: long enough for a slow box to fill the two)."""
    count = 2 * CHUNK_JOBS + 3
    app = create_app(ingress_settings)
    state = app.state.ingress
    state.singles = SingleJobPublisher(state.broker, topology.jobs_exchange, 10.0, hold_s=2.0, group_past=0)

    async def submit(client: httpx.AsyncClient, n: int) -> httpx.Response:
        headers = {"Idempotency-Key": f"job-{n}"} if with_key else {}
        job = {"input": {"sleep_ms": 0}, "callback_url": receiver.url, "metadata": {"n": n}}
        return await client.post("/v1/models/synthetic/jobs", json=job, headers=headers)

    async with app.router.lifespan_context(app):
        await wait_until(lambda: state.broker.is_ready, 10, "broker ready")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://ingress"
        ) as client:
            answers = await asyncio.gather(*(submit(client, n) for n in range(count)))
            replayed = await submit(client, 0) if with_key else None
            metrics = (await client.get("/metrics")).text
    chunks = await queue_holds(amqp_url, topology.chunk_queue("synthetic", "normal"), 2)
    held = await jobs_held(amqp_url, topology, "synthetic")
    async with running_worker(SyntheticModel(), worker_settings):
        callbacks = await receiver.wait_for(count, timeout_s=30)
    drained = await jobs_held(amqp_url, topology, "synthetic")
    ids = [a.json()["id"] for a in answers]
    metadata = {c.event["data"]["id"]: c.event["data"]["metadata"] for c in callbacks}

    assert [a.status_code for a in answers] == [202] * count
    assert chunks and held == count
    assert 'inferq_ingress_single_jobs_sent_total{how="in-a-chunk"} 64.0' in metrics
    assert 'inferq_ingress_single_jobs_sent_total{how="alone-after-hold"} 3.0' in metrics
    assert Counter(c.event["data"]["id"] for c in callbacks) == Counter(ids)  # each once
    assert all(c.verified and c.event["type"] == "job.succeeded" for c in callbacks)
    assert metadata == {job_id: {"n": n} for n, job_id in enumerate(ids)}
    assert drained == 0
    if replayed is not None:  # the key's promise holds for a grouped job: the same job again
        assert replayed.status_code == 202 and replayed.json()["id"] == ids[0]
        assert replayed.headers["Idempotent-Replayed"] == "true"
