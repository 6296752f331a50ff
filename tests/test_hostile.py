"""Hostile input and broker trouble: one regression test per finding of the hardening
issue (the item number is in each test's docstring). Real broker, real receiver."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
import pytest

from autoscaler.queue_metrics import management_url_from_amqp
from broker.client import Broker, TopologyMismatch
from broker.settlement import settle
from callbacks.dispatcher import CallbackDispatcher
from ingress.settings import IngressSettings
from job_records.store import JobRecords
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from ray_workers.settings import WorkerSettings
from tests.conftest import callbacks_in, drain_queue, running_ingress, running_worker, wait_until
from tests.models import ContestedModel, GatedModel, PoisonModel, RecordingModel
from wire.envelope import ATTEMPT_HEADER, Job
from wire.job_message import job_message
from wire.outgoing import Publish
from wire.retry_tiers import RetrySchedule


def _jobs(inputs: Sequence[Any]) -> list[Job]:
    now_ms = int(time.time() * 1000)
    return [
        Job(
            id=str(uuid.uuid4()),
            model="echo",
            input=value,
            callback_url="http://127.0.0.1:9/",
            submitted_at_ms=now_ms,
        )
        for value in inputs
    ]


async def _publish(broker: Broker, jobs: Sequence[Job]) -> None:
    for job in jobs:
        await broker.publish(job_message(job), "echo", exchange=broker.topology.jobs_exchange)


async def test_given_one_poison_input_in_a_batch_then_only_its_job_is_charged_an_attempt(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Item 8: the failing input is isolated (halving); the seven jobs batched with it succeed
    on their first attempt instead of burning it."""
    settings = replace(
        worker_settings, batching=Batching(adaptive=False, max_size=8), breaker_failure_threshold=1000
    )
    jobs = _jobs([0, 1, 2, "poison", 4, 5, 6, 7])
    await _publish(broker, jobs)
    model = PoisonModel()
    succeeded: dict[str, int] = {}

    async def seven_succeeded() -> bool:
        for callback in callbacks_in(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)):
            event = callback.event
            if event.type == "job.succeeded":
                succeeded[event.data.id] = event.data.attempts
        return len(succeeded) >= 7

    async with running_worker(model, settings):
        await wait_until(seven_succeeded, 20, "the seven good jobs' callbacks")

    assert succeeded == {job.id: 1 for job in jobs if job.input != "poison"}
    assert model.batch_sizes[:7] == [8, 4, 4, 2, 2, 1, 1]  # one batch, then two halvings per level


async def test_given_two_poison_inputs_in_both_halves_of_a_small_batch_then_only_they_are_charged(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Retries bunch after an outage, so a small batch may hold two failing inputs, one in
    each half: both halves failing is then not the model's failure, and the six good jobs
    succeed on their first attempt."""
    settings = replace(
        worker_settings, batching=Batching(adaptive=False, max_size=8), breaker_failure_threshold=1000
    )
    jobs = _jobs(["poison", 1, 2, 3, 4, 5, 6, "poison"])
    await _publish(broker, jobs)
    model = PoisonModel()
    succeeded: dict[str, int] = {}

    async def six_succeeded() -> bool:
        for callback in callbacks_in(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)):
            if callback.event.type == "job.succeeded":
                succeeded[callback.event.data.id] = callback.event.data.attempts
        return len(succeeded) >= 6

    async with running_worker(model, settings):
        await wait_until(six_succeeded, 20, "the six good jobs' callbacks")

    assert succeeded == {job.id: 1 for job in jobs if job.input != "poison"}
    assert model.batch_sizes[0] == 8


async def test_given_a_model_failing_fast_then_the_batch_size_does_not_grow(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Item 8: a batch that fails at once is not a fast batch; slow start must not double on it."""
    settings = replace(worker_settings, batching=Batching(max_size=64), breaker_failure_threshold=1000)
    await _publish(broker, _jobs(range(200)))
    model = RecordingModel(healthy=False)

    async with running_worker(model, settings) as worker:
        await wait_until(lambda: model.calls >= 12, 20, "a dozen failed batches")
        size = worker.batching.size

    assert size == 1


async def test_given_a_drain_then_no_batch_is_taken_from_the_inbox_after_it_began(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Item 10: stop() lets the batch in flight finish and takes no new one: every job either
    ran to a callback or is back on the queue, none was cut off mid-inference."""
    settings = replace(worker_settings, batching=Batching(adaptive=False, max_size=4))
    jobs = _jobs(range(40))
    await _publish(broker, jobs)
    model = RecordingModel()
    async with running_worker(model, settings):
        await wait_until(lambda: model.calls >= 2, 20, "two batches")
    ran = sum(len(batch.attempts) for batch in model.batches)
    called_back = callbacks_in(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue))
    left = await drain_queue(settings.amqp_url, settings.topology.main_queue("echo"))

    assert len(called_back) == ran  # every batch that started was settled
    assert len(called_back) + len(left) == len(jobs)
    assert all(m.headers[ATTEMPT_HEADER] == 1 for m in left)  # returned unspent


async def test_given_a_refused_publish_then_the_delivery_is_requeued_at_once_on_its_live_channel(
    broker: Broker, worker_settings: WorkerSettings
) -> None:
    """Item 3: settle() nacks with requeue when the outcome's publish is refused, instead of
    leaving the delivery unacked on an open channel until the consumer timeout."""
    queue = worker_settings.topology.main_queue("echo")
    await _publish(broker, _jobs(["x"]))
    async with broker.fetching(queue) as next_message:
        delivery = await next_message()
        assert delivery is not None
        unroutable = Publish(job_message(_jobs(["y"])[0]), "no-such-queue-" + uuid.uuid4().hex)
        settled = await settle(broker, [(delivery, [unroutable])])
        assert delivery.channel_open
        assert (settled.acked, settled.requeued) == (0, 1)
        again = await next_message()  # back in the queue now, on the same live channel
        assert again is not None and again.message_id == delivery.message_id
        await settle(broker, [(again, [])])
    assert await drain_queue(worker_settings.amqp_url, queue) == []


async def test_given_a_full_queue_when_a_retry_delay_ends_then_the_retry_still_comes_back(
    ingress_settings: IngressSettings,
    worker_settings: WorkerSettings,
    receiver: CallbackReceiver,
    dispatcher: CallbackDispatcher,
) -> None:
    """Item 1: MAX_QUEUE_LENGTH guards new jobs only; a retry dead-lettering into a full queue
    is not dropped, and the job reaches its terminal state."""
    # A 2 s delay: the filler must be admitted while the retry waits, which a shorter one
    # raced (the worker's stop and the depth read against the delay).
    retries = {"echo": RetrySchedule((2.0,))}
    topology = replace(worker_settings.topology, max_queue_length=1, job_retries_by_model=retries)
    settings = replace(worker_settings, topology=topology, batching=Batching(max_size=1))
    model = RecordingModel(fail_until_attempt=2)  # attempt 1 fails transiently
    async with running_ingress(replace(ingress_settings, topology=topology)) as client:
        job = {"input": "retried", "callback_url": receiver.url}
        first = await client.post("/v1/models/echo/jobs", json=job)
        async with running_worker(model, settings):
            await wait_until(lambda: model.calls >= 1, 10, "the first, failing attempt")
        filled: list[httpx.Response] = []

        async def filler_accepted() -> bool:
            # The first job left the queue for its retry tier; once the ingress reads the
            # depth again (every 0.25 s) there is room for exactly one more.
            response = await client.post("/v1/models/echo/jobs", json={**job, "input": "filler"})
            filled.append(response)
            return response.status_code == 202

        await wait_until(filler_accepted, 10, "room for the filler")
        filler = filled[-1]
        refused = await client.post("/v1/models/echo/jobs", json={**job, "input": "refused"})
        assert (first.status_code, refused.status_code) == (202, 503)

        main_queue = topology.main_queue("echo")
        broker = Broker(settings.amqp_url, topology, settings.models)
        await broker.connect()
        try:
            # The retry tier's delay ends while the queue holds the filler: it comes back.
            await wait_until(
                lambda: _depth_at_least(broker, main_queue, 2), 10, "the retry back in the full queue"
            )
            async with running_worker(model, settings):
                received = await receiver.wait_for(2, timeout_s=15)
        finally:
            await broker.delete_topology()  # its 2 s tier too, which the fixture does not know
            await broker.close()

    outcomes = {r.event["data"]["id"]: (r.event["type"], r.event["data"]["attempts"]) for r in received}
    assert outcomes[first.json()["id"]] == ("job.succeeded", 2)
    assert outcomes[filler.json()["id"]][0] == "job.succeeded"


async def _depth_at_least(broker: Broker, queue: str, count: int) -> bool:
    ready, _ = await broker.queue_depth(queue)
    return ready >= count


async def test_given_a_main_queue_from_an_older_version_then_connect_fails_naming_it_and_the_way_out(
    amqp_url: str, worker_settings: WorkerSettings
) -> None:
    """Item 1, upgrading: the main queues no longer carry x-max-length; one declared with it by
    an older version is a loud, named error at start, never a silent mismatch."""
    topology = worker_settings.topology
    old = await aio_pika.connect(amqp_url)
    async with old:
        channel = await old.channel()
        await channel.declare_queue(
            topology.main_queue("echo"),
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-max-priority": 2,
                "x-max-length": 10,
                "x-overflow": "reject-publish",
            },
        )
    broker = Broker(amqp_url, topology, ("echo",))
    with pytest.raises(
        TopologyMismatch, match=rf"queue {re.escape(topology.main_queue('echo'))} exists.*QUEUE_PREFIX"
    ):
        await broker.connect()
    assert not broker.is_ready


@pytest.mark.slow
async def test_given_a_connection_lost_with_prefetched_jobs_then_they_are_not_run_on_the_dead_channel(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Item 2: deliveries waiting in the inbox when their connection is lost are dropped, not
    run: the broker hands them out again after the reconnect and they run once, there."""
    settings = replace(worker_settings, batching=Batching(adaptive=False, max_size=2, max_wait_ms=500))
    jobs = _jobs(range(6))
    await _publish(broker, jobs)
    management = _Management(management_url_from_amqp(settings.amqp_url))
    model = GatedModel()
    seen: dict[str, list[str]] = {}
    try:
        async with running_worker(model, settings):
            await wait_until(lambda: len(model.ran) == 2, 10, "the first batch running (gated)")
            queue = settings.topology.main_queue("echo")
            await wait_until(lambda: _connection_listed(management, settings), 15, "the connection listed")
            await wait_until(lambda: _unacked_at_least(management, queue, 4), 15, "two more jobs prefetched")
            name = f"{settings.topology.prefix}worker-echo.consume"
            closed = await management.connection_id(name)
            assert closed is not None and await management.close(closed)

            async def reconnected() -> bool:
                return (await management.connection_id(name)) not in (None, closed)

            # Once the worker has reconnected, the broker has handed the four jobs out again
            # on the new channel; the two still in the inbox belong to the dead one.
            await wait_until(reconnected, 20, "the worker's consume connection to come back")
            model.gate.set()

            async def all_called_back() -> bool:
                messages = await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)
                for delivery in callbacks_in(messages):
                    seen.setdefault(delivery.event.data.id, []).append(delivery.webhook_id)
                return len(seen) == len(jobs)

            await wait_until(all_called_back, 30, "a callback for every job")
    finally:
        model.gate.set()
        await management.aclose()

    waiting_then = [job.input for job in jobs[2:4]]  # in the inbox when the connection went
    assert all(model.ran.count(value) == 1 for value in waiting_then), f"batches: {model.batches}"
    assert all(len(set(ids)) == 1 for ids in seen.values())  # duplicates, if any, share the webhook-id


async def _connection_listed(management: _Management, settings: WorkerSettings) -> bool:
    return await management.connection_id(f"{settings.topology.prefix}worker-echo.consume") is not None


async def _unacked_at_least(management: _Management, queue: str, count: int) -> bool:
    return (await management.queue_unacked(queue)) >= count


class _Management:
    """The broker's management API, for what a test does to the broker from outside."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._client = httpx.AsyncClient(
            base_url=f"http://{parts.hostname}:{parts.port}",
            auth=(parts.username or "", parts.password or ""),
        )

    async def queue_unacked(self, queue: str) -> int:
        response = await self._client.get(f"/api/queues/%2F/{quote(queue, safe='')}")
        return int(response.json().get("messages_unacknowledged", 0)) if response.status_code == 200 else 0

    async def connection_id(self, connection_name: str) -> str | None:
        """The broker's name (its addresses) for the connection the client named so, if listed."""
        for connection in (await self._client.get("/api/connections")).json():
            if connection.get("client_properties", {}).get("connection_name") == connection_name:
                return str(connection["name"])
        return None

    async def close(self, connection_id: str) -> bool:
        response = await self._client.delete(f"/api/connections/{quote(connection_id, safe='')}")
        return response.status_code in (200, 204)

    async def aclose(self) -> None:
        await self._client.aclose()


async def _callbacks_after_barrier(settings: WorkerSettings, model: Any, jobs: Sequence[Job]) -> list[Any]:
    """Run a worker until the last job (a plain one, queued behind the others) is called
    back; returns every callback event published meanwhile."""
    events: list[Any] = []

    async def barrier_done() -> bool:
        for callback in callbacks_in(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)):
            events.append(callback.event)
        return any(event.data.id == jobs[-1].id for event in events)

    async with running_worker(model, settings):
        await wait_until(barrier_done, 15, "the barrier job's callback")
    return events


@pytest.mark.parametrize("quick_batch_s", [0.0, 30.0], ids=["marked-first", "quick"])
async def test_given_a_job_already_recorded_as_ended_then_its_copy_resends_that_ending_not_its_own(
    worker_settings: WorkerSettings, broker: Broker, redis_url: str, quick_batch_s: float
) -> None:
    """Item 2: a redelivered copy of a finished job sends the recorded ending again (the
    copy that recorded it may have died before its event was confirmed), with the same
    webhook-id, so a receiver may see it twice but never a different ending. Marked
    running first, the copy does not run; in a quick batch (after a first job, so the
    model's time is known) it may, and what it ran to is dropped."""
    first, again, barrier = _jobs(["first", "again", "barrier"])
    records = JobRecords(redis_url, worker_settings.topology.prefix, ttl_s=60)
    try:
        await records.finish([(again, "succeeded", 1, "earlier output", None)])
    finally:
        await records.close()
    await _publish(broker, [first, again, barrier])
    model = RecordingModel()
    settings = replace(worker_settings, quick_batch_s=quick_batch_s)

    events = await _callbacks_after_barrier(settings, model, [first, again, barrier])

    by_id = {event.data.id: event for event in events}
    assert set(by_id) == {first.id, again.id, barrier.id}
    assert by_id[again.id].type == "job.succeeded" and by_id[again.id].data.output == "earlier output"
    ran = sum(len(batch.attempts) for batch in model.batches)
    assert ran == (3 if quick_batch_s else 2)  # marked first: only the first and the barrier
    assert await drain_queue(worker_settings.amqp_url, worker_settings.topology.main_queue("echo")) == []
    records = JobRecords(redis_url, worker_settings.topology.prefix, ttl_s=60)
    try:
        record = await records.get(again.id)
    finally:
        await records.close()
    assert record is not None and (record.status, record.output, record.attempts) == (
        "succeeded",
        "earlier output",
        1,
    )


async def test_given_a_copy_that_would_end_differently_then_it_sends_nothing_and_is_not_parked(
    worker_settings: WorkerSettings, broker: Broker, redis_url: str
) -> None:
    """Item 2: one job id never produces two different terminal events. Here a copy on its
    last attempt fails after another copy was recorded as succeeded: it sends no job.failed
    and parks nothing."""
    contested, barrier = _jobs(["contested", "barrier"])
    model = ContestedModel(redis_url, worker_settings.topology.prefix)
    model.contested_job_id = contested.id
    last_attempt = len(worker_settings.topology.job_retry_schedule("echo").delays_s) + 1
    await broker.publish(
        job_message(contested, {ATTEMPT_HEADER: last_attempt}), "echo", exchange=broker.topology.jobs_exchange
    )
    await _publish(broker, [barrier])

    events = await _callbacks_after_barrier(worker_settings, model, [contested, barrier])

    assert [event.data.id for event in events] == [barrier.id]
    topology = worker_settings.topology
    assert await drain_queue(worker_settings.amqp_url, topology.parking_queue("echo")) == []
    assert await drain_queue(worker_settings.amqp_url, topology.main_queue("echo")) == []
