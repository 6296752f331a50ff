"""Chunks (`wire.job_chunk`): a batch's full chunks of CHUNK_JOBS jobs go to the broker as
one message each, against the real broker, Redis and HTTP: every job still runs, retries
and calls back as if it had come alone; a chunk is settled with its last job; every count
of waiting jobs counts a chunk as its jobs; a parked chunk replays as its jobs."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from broker.client import Broker, Delivery, ack_all, chunk_parts
from callbacks.dispatcher import CallbackDispatcher
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from parking_lot.lots import ParkingLot, replay
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tests.conftest import fresh_topology, jobs_held, queue_holds, running_ingress, running_worker, wait_until
from wire.envelope import PARK_REASON_HEADER, Job
from wire.job_chunk import CHUNK_JOBS, CHUNK_MAX_BYTES, CHUNK_TYPE, chunk_message, chunked_jobs
from wire.job_message import job_message
from wire.topology import Topology


async def _batch(
    client: httpx.AsyncClient, jobs: list[dict[str, Any]], model: str = "synthetic"
) -> httpx.Response:
    return await client.post(f"/v1/models/{model}/jobs/batch", json={"jobs": jobs})


@pytest.fixture(params=["classic", "quorum"])
async def topology(request: pytest.FixtureRequest, amqp_url: str, redis_url: str) -> AsyncIterator[Topology]:
    """Both queue types: the conftest's ingress, worker and dispatcher run on each."""
    async with fresh_topology(amqp_url, redis_url, request.param) as topo:
        yield topo


def _jobs(count: int) -> list[Job]:
    now_ms = int(time.time() * 1000)
    return [Job(id=str(uuid.uuid4()), model="echo", input=n, submitted_at_ms=now_ms) for n in range(count)]


async def test_given_a_batch_of_chunks_then_each_job_runs_alone_once_and_a_failed_one_retries_alone(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    topology: Topology,
    amqp_url: str,
) -> None:
    count = 2 * CHUNK_JOBS + 5
    jobs: list[dict[str, Any]] = [
        {"input": {"sleep_ms": 0}, "callback_url": receiver.url, "metadata": {"n": n}} for n in range(count)
    ]
    jobs[CHUNK_JOBS + 3]["input"] = {"fail_until_attempt": 2}  # in the second chunk

    accepted = await _batch(client, jobs)
    ids = [job["id"] for job in accepted.json()["jobs"]]
    chunks_queued = await queue_holds(amqp_url, topology.chunk_queue("synthetic", "normal"), 2)
    singles_queued = await queue_holds(amqp_url, topology.job_queue("synthetic", "normal"), 5)
    held = await jobs_held(amqp_url, topology, "synthetic")
    async with running_worker(SyntheticModel(), worker_settings):
        callbacks = await receiver.wait_for(count, timeout_s=30)
    # The worker stopped: a chunk it had not acked would be back in its queue now.
    drained = await jobs_held(amqp_url, topology, "synthetic")
    by_job = Counter(c.event["data"]["id"] for c in callbacks)
    attempts = {c.event["data"]["id"]: c.event["data"]["attempts"] for c in callbacks}
    metadata = {c.event["data"]["id"]: c.event["data"]["metadata"] for c in callbacks}

    assert accepted.status_code == 202, accepted.text
    assert chunks_queued and singles_queued and held == count
    assert by_job == Counter(ids)  # every job called back, once
    assert all(c.verified and c.event["type"] == "job.succeeded" for c in callbacks)
    assert metadata == {job_id: {"n": n} for n, job_id in enumerate(ids)}
    assert attempts[ids[CHUNK_JOBS + 3]] == 2
    assert {attempts[job_id] for n, job_id in enumerate(ids) if n != CHUNK_JOBS + 3} == {1}
    assert drained == 0


async def test_given_a_chunks_parts_then_the_chunk_is_acked_with_the_last_or_given_back_whole(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    """Acked parts hold the chunk until the last; one part requeued gives the whole chunk
    back once every part is settled, and it comes again with all its jobs."""
    queue = topology.chunk_queue("echo", "normal")
    messages = [job_message(job) for job in _jobs(CHUNK_JOBS)]
    await broker.publish(
        chunk_message(messages), topology.chunk_routing_key("echo", "normal"), exchange=topology.jobs_exchange
    )
    received: list[Delivery] = []

    async def hold(delivery: Delivery) -> None:
        received.append(delivery)

    tag = await broker.consume(queue, 1, hold, replicated=topology.replicated)
    await wait_until(lambda: len(received) == 1, 10, "the chunk")
    parts = chunk_parts(received[0])
    await ack_all(parts[:-1])
    held_while_one_part_runs = await queue_holds(amqp_url, queue, 0) and not received[0].settled
    await parts[-1].requeue()
    await wait_until(lambda: len(received) == 2, 10, "the chunk again")
    again = chunk_parts(received[1])
    await ack_all(again)
    await broker.cancel(tag, close_channel=True)

    assert [part.message_id for part in parts] == [m.message_id for m in messages]
    assert [part.body for part in again] == [m.body for m in messages]
    assert held_while_one_part_runs
    assert received[1].settled and await queue_holds(amqp_url, queue, 0)


async def test_given_chunks_queued_then_admission_counts_each_as_its_jobs(
    ingress_settings: IngressSettings, topology: Topology, amqp_url: str
) -> None:
    """A second ingress process reads the depth from the broker: two chunk messages are
    2 x CHUNK_JOBS jobs against MAX_QUEUE_LENGTH, not two."""
    limit = 3 * CHUNK_JOBS
    settings = dataclasses.replace(
        ingress_settings, topology=dataclasses.replace(topology, max_queue_length=limit)
    )
    backlog = [{"input": n} for n in range(2 * CHUNK_JOBS)]
    async with running_ingress(settings) as first:
        accepted = await _batch(first, backlog, model="echo")
    async with running_ingress(settings) as second:
        refused = await _batch(second, backlog, model="echo")
        fits = await _batch(second, backlog[:CHUNK_JOBS], model="echo")

    assert accepted.status_code == 202 and fits.status_code == 202
    assert refused.status_code == 503 and f"holds about {2 * CHUNK_JOBS} jobs" in refused.json()["detail"]
    assert await jobs_held(amqp_url, topology, "echo") == 3 * CHUNK_JOBS


async def test_given_a_parked_chunk_then_replay_sends_its_jobs_back_one_by_one(
    broker: Broker, topology: Topology, amqp_url: str
) -> None:
    """A quorum queue dead-letters a chunk delivered too often into the parking lot whole;
    replay puts each of its jobs back in the model's queue as a message of its own."""
    lot = ParkingLot(topology, "echo")
    jobs = _jobs(CHUNK_JOBS)
    chunk = chunk_message([job_message(job) for job in jobs])
    parked = dataclasses.replace(chunk, headers={PARK_REASON_HEADER: "delivery limit"})
    await broker.publish(parked, lot.queue, exchange=lot.exchange)

    result = await replay(broker, lot)

    assert result.moved == CHUNK_JOBS and not result.kept
    assert await queue_holds(amqp_url, lot.queue, 0)
    assert await queue_holds(amqp_url, topology.job_queue("echo", "normal"), CHUNK_JOBS)
    assert await queue_holds(amqp_url, topology.chunk_queue("echo", "normal"), 0)


def test_a_chunk_carries_each_jobs_message_as_it_would_come_alone() -> None:
    messages = [job_message(job, {"x-attempt": 1, "x-tenant": "acme"}) for job in _jobs(CHUNK_JOBS)]
    chunk = chunk_message(messages)
    parts = chunked_jobs(chunk.body)

    assert chunk.type == CHUNK_TYPE and chunk.priority == messages[0].priority
    assert [(p.message_id, p.priority, dict(p.headers), p.body) for p in parts] == [
        (m.message_id, m.priority, dict(m.headers or {}), m.body) for m in messages
    ]


async def test_given_a_worker_stopping_mid_chunk_then_its_waiting_jobs_go_back_alone_and_none_runs_twice(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    topology: Topology,
    amqp_url: str,
) -> None:
    """A scale-down while a chunk is half done: given back whole, its finished jobs would
    call back again; instead its waiting jobs are handed back one by one and the chunk acked."""
    fixed = Batching(adaptive=False, max_size=2, max_wait_ms=1)
    slow = dataclasses.replace(worker_settings, batching=fixed, batching_by_model={})
    jobs = [{"input": {"sleep_ms": 20}, "callback_url": receiver.url} for _ in range(CHUNK_JOBS)]
    accepted = await _batch(client, jobs)
    ids = [job["id"] for job in accepted.json()["jobs"]]

    async with running_worker(SyntheticModel(), slow):
        await receiver.wait_for(4, timeout_s=20)
    chunk_acked = await queue_holds(amqp_url, topology.chunk_queue("synthetic", "normal"), 0)
    async with running_worker(SyntheticModel(), slow):
        await receiver.wait_for(CHUNK_JOBS, timeout_s=30)
    by_job = Counter(c.event["data"]["id"] for c in receiver.received)
    attempts = {c.event["data"]["attempts"] for c in receiver.received}

    assert chunk_acked
    assert by_job == Counter(ids) and attempts == {1}


async def test_given_large_jobs_in_a_batch_then_only_runs_within_the_chunk_bytes_are_chunked(
    client: httpx.AsyncClient, topology: Topology, amqp_url: str
) -> None:
    """A chunk holds at most CHUNK_MAX_BYTES of jobs: a worker's chunk consumers each hold
    a chunk, so chunks of large jobs would hold many MiB."""
    large = "x" * (2 * CHUNK_MAX_BYTES // CHUNK_JOBS)  # a chunk of them would be twice the bound
    jobs = [{"input": large} for _ in range(CHUNK_JOBS)] + [{"input": n} for n in range(CHUNK_JOBS)]

    accepted = await _batch(client, jobs, model="echo")

    assert accepted.status_code == 202, accepted.text
    assert await queue_holds(amqp_url, topology.chunk_queue("echo", "normal"), 1)  # the small ones
    assert await queue_holds(amqp_url, topology.job_queue("echo", "normal"), CHUNK_JOBS)
