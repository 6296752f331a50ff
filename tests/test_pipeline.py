"""The worker and callback stages end to end, in process: HTTP ingress -> real broker ->
JobWorker -> callbacks queue -> CallbackDispatcher -> real HTTP receiver."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from ray_workers.job_worker import JobWorker
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tests.conftest import drain_queue, running_worker, wait_until
from wire.envelope import PARK_REASON_HEADER, Job, decode_callback_delivery
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage


@pytest.fixture
async def workers(
    worker_settings: WorkerSettings, dispatcher: CallbackDispatcher
) -> AsyncIterator[list[JobWorker]]:
    started = [JobWorker(EchoModel(), worker_settings), JobWorker(SyntheticModel(), worker_settings)]
    for worker in started:
        await worker.start()
    yield started
    for worker in started:
        await worker.stop()


async def _submit(client: httpx.AsyncClient, model: str, payload: dict[str, Any]) -> str:
    response = await client.post(f"/v1/models/{model}/jobs", json=payload)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def test_given_running_workers_when_jobs_are_submitted_then_signed_callbacks_carry_results(
    client: httpx.AsyncClient, receiver: CallbackReceiver, workers: list[JobWorker]
) -> None:
    echo_id = await _submit(
        client,
        "echo",
        {"input": {"hello": ["world", 1]}, "callback_url": receiver.url, "metadata": {"trace": "t1"}},
    )
    slow_id = await _submit(client, "synthetic", {"input": {"sleep_ms": 20}, "callback_url": receiver.url})

    received = await receiver.wait_for(2, timeout_s=15)

    by_id = {r.event["data"]["id"]: r for r in received}
    assert set(by_id) == {echo_id, slow_id}
    assert all(r.verified for r in received)
    echo = by_id[echo_id]
    assert echo.event["type"] == "job.succeeded"
    assert echo.webhook_id == f"msg_{echo_id}_succeeded"
    assert echo.event["data"]["output"] == {"hello": ["world", 1]}
    assert echo.event["data"]["metadata"] == {"trace": "t1"}
    assert echo.event["data"]["attempts"] == 1
    timings = by_id[slow_id].event["data"]["timings"]
    assert timings["inference_ms"] >= 20 and timings["batch_size"] == 1
    assert timings["queued_ms"] >= 0


async def test_given_jobs_submitted_then_each_callback_times_its_queue_wait_below_a_millisecond(
    client: httpx.AsyncClient, receiver: CallbackReceiver, workers: list[JobWorker]
) -> None:
    """A lone job waits 1-2 ms in the queue: timed in whole milliseconds (the ingress's and
    the worker's clocks truncated), every wait read 1 or 2, and the bench's per-job
    timeline could not show where a fraction of a millisecond went."""
    before_ms = time.time() * 1000
    for n in range(5):
        await _submit(client, "echo", {"input": n, "callback_url": receiver.url})
    received = await receiver.wait_for(5, timeout_s=15)
    elapsed_ms = time.time() * 1000 - before_ms

    waits = [r.event["data"]["timings"]["queued_ms"] for r in received]
    assert all(0 <= wait <= elapsed_ms + 0.5 for wait in waits), waits
    assert any(wait != int(wait) for wait in waits), f"every queue wait in whole milliseconds: {waits}"


async def test_given_workers_paused_when_they_start_then_high_runs_before_normal_before_low(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    submitted = {}
    for priority in ["low", "normal", "high"] * 3:
        job_id = await _submit(
            client, "echo", {"input": priority, "callback_url": receiver.url, "priority": priority}
        )
        submitted[job_id] = priority
    # One job at a time, so the consumption order is the broker's priority order.
    async with running_worker(EchoModel(), replace(worker_settings, batching=Batching(max_size=1))):
        received = await receiver.wait_for(9, timeout_s=15)

    in_run_order = sorted(received, key=lambda r: r.event["timestamp"])
    assert [submitted[r.event["data"]["id"]] for r in in_run_order] == (
        ["high"] * 3 + ["normal"] * 3 + ["low"] * 3
    )


async def test_given_an_input_the_model_refuses_then_job_failed_is_called_back(
    client: httpx.AsyncClient, receiver: CallbackReceiver, workers: list[JobWorker]
) -> None:
    job_id = await _submit(
        client, "synthetic", {"input": {"fail_permanently": True}, "callback_url": receiver.url}
    )
    # A shape the model's input schema refuses never gets that far: 422 at submit.
    bad_shape = await client.post(
        "/v1/models/synthetic/jobs", json={"input": {"sleep_ms": "soon"}, "callback_url": receiver.url}
    )

    received = await receiver.wait_for(1, timeout_s=15)

    assert received[0].event["data"]["id"] == job_id and received[0].event["type"] == "job.failed"
    assert "fail_permanently" in received[0].event["data"]["error"]
    assert "output" not in received[0].event["data"]
    assert bad_shape.status_code == 422 and bad_shape.json()["errors"][0]["pointer"] == "/input/sleep_ms"


async def test_given_a_poison_message_then_it_is_parked_and_the_jobs_behind_it_flow(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    workers: list[JobWorker],
    worker_settings: WorkerSettings,
) -> None:
    broker = Broker(worker_settings.amqp_url, worker_settings.topology, worker_settings.models)
    await broker.connect()
    try:
        await broker.publish(
            OutgoingMessage(b"\x00not json", message_id="poison-1"),
            worker_settings.topology.main_queue("echo"),
        )
    finally:
        await broker.close()
    job_id = await _submit(client, "echo", {"input": "after", "callback_url": receiver.url})

    received = await receiver.wait_for(1, timeout_s=15)
    parked_queue = worker_settings.topology.parking_queue("echo")
    parked: list[Any] = []

    async def poison_parked() -> bool:
        parked.extend(await drain_queue(worker_settings.amqp_url, parked_queue))
        return bool(parked)

    await wait_until(poison_parked, 10, "the poison message in the parking lot")
    assert received[0].event["data"]["id"] == job_id
    assert parked[0].message_id == "poison-1" and parked[0].body == b"\x00not json"
    assert "not a valid Job" in parked[0].headers[PARK_REASON_HEADER]


async def test_given_a_worker_stopped_mid_batch_when_another_starts_then_the_job_completes(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    first = JobWorker(SyntheticModel(), worker_settings)
    await first.start()
    job_id = await _submit(client, "synthetic", {"input": {"sleep_ms": 1500}, "callback_url": receiver.url})
    queue = worker_settings.topology.main_queue("synthetic")
    probe = Broker(worker_settings.amqp_url, worker_settings.topology, worker_settings.models)
    await probe.connect()
    try:

        async def taken() -> bool:
            ready, _consumers = await probe.queue_depth(queue)
            return ready == 0

        await wait_until(taken, 10, "the worker to take the job")
        await first.stop(drain_timeout_s=0)  # abandon the batch: it must go back to the queue
        ready, consumers = await probe.queue_depth(queue)
        assert (ready, consumers) == (1, 0)
    finally:
        await probe.close()

    second = JobWorker(SyntheticModel(), worker_settings)
    await second.start()
    try:
        received = await receiver.wait_for(1, timeout_s=15)
    finally:
        await second.stop()
    assert received[0].event["data"]["id"] == job_id
    assert received[0].event["type"] == "job.succeeded"


async def _publish_job(settings: WorkerSettings, callback_url: str) -> str:
    """A job put straight on the queue, as if the ingress had allowed its URL."""
    job = Job(
        id=str(uuid.uuid4()),
        model="echo",
        input="direct",
        callback_url=callback_url,
        submitted_at_ms=int(time.time() * 1000),
    )
    broker = Broker(settings.amqp_url, settings.topology, settings.models)
    await broker.connect()
    try:
        await broker.publish(job_message(job), settings.topology.main_queue("echo"))
    finally:
        await broker.close()
    return job.id


async def _wait_parked_callback(settings: WorkerSettings) -> tuple[Any, str]:
    parked: list[Any] = []

    async def arrived() -> bool:
        parked.extend(await drain_queue(settings.amqp_url, settings.topology.callbacks_parking_queue))
        return bool(parked)

    await wait_until(arrived, 15, "a parked callback")
    return decode_callback_delivery(parked[0].body), parked[0].headers[PARK_REASON_HEADER]


async def test_given_a_callback_to_a_loopback_address_off_the_allow_list_then_no_packet_and_parked(
    worker_settings: WorkerSettings,
    workers: list[JobWorker],
    webhook_secret: str,
) -> None:
    for host in ("127.0.0.2", "::1"):
        trap = CallbackReceiver(webhook_secret, host=host)
        await trap.start()
        try:
            job_id = await _publish_job(worker_settings, trap.url)
            parked, reason = await _wait_parked_callback(worker_settings)
        finally:
            await trap.stop()
        assert trap.requests_seen == 0
        assert parked.event.data.id == job_id
        assert "refused" in reason and "loopback" in reason


async def test_given_a_receiver_that_fails_twice_then_the_retry_delivers_with_the_same_webhook_id(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    workers: list[JobWorker],
) -> None:
    receiver.scripted_statuses.extend([503, 500])
    job_id = await _submit(client, "echo", {"input": 1, "callback_url": receiver.url})

    received = await receiver.wait_for(1, timeout_s=15)

    assert receiver.requests_seen == 3
    assert received[0].webhook_id == f"msg_{job_id}_succeeded"
    assert received[0].verified


async def test_given_a_receiver_that_never_answers_then_the_callback_is_parked_not_lost(
    worker_settings: WorkerSettings,
    workers: list[JobWorker],
) -> None:
    closed_port_url = "http://127.0.0.1:9/callbacks"  # discard port: nothing listens
    job_id = await _publish_job(worker_settings, closed_port_url)

    parked, reason = await _wait_parked_callback(worker_settings)

    assert parked.event.data.id == job_id
    assert parked.event.data.output == "direct"
    assert "transport" in reason
