"""The callback express lane: at low load a lone job's event reaches the dispatcher
through Redis as its ending is recorded; its broker copy stays the durable one, and each
event is sent once whichever copy gets there first. Real broker, real Redis, real
receiver."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from broker.client import Broker
from callbacks.delivery_metrics import CALLBACK_SERIES, DeliveryMetrics
from callbacks.dispatcher import CallbackDispatcher
from callbacks.express_lane import ExpressLane
from callbacks.settings import CallbackSettings
from job_records.store import EXPRESS_LANE_LONGEST, ExpressOffer, JobRecords
from loadgen.callback_receiver import CallbackReceiver
from metrics.series import PrometheusSink
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings
from tests.conftest import running_worker, wait_until
from wire.callback_events import callback_for, expressed
from wire.envelope import Job, JobTimings
from wire.outgoing import Publish
from wire.topology import Topology

TIMINGS = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)


@pytest.fixture
async def records(redis_url: str, topology: Topology) -> AsyncIterator[JobRecords]:
    store = JobRecords(redis_url, topology.prefix, ttl_s=60)
    yield store
    await store.close()


def _ending(topology: Topology, callback_url: str) -> tuple[Job, Publish]:
    job = Job(
        id=str(uuid.uuid4()),
        model="echo",
        input=1,
        callback_url=callback_url,
        submitted_at_ms=int(time.time() * 1000),
    )
    return job, callback_for(job, "succeeded", 1, TIMINGS, time.time(), topology, output=1)


async def _recorded_with_offer(records: JobRecords, job: Job, event: Publish) -> ExpressOffer:
    offer = ExpressOffer({job.id: event.message.body})
    await records.finish([(job, "succeeded", 1, 1, None)], offer)
    return offer


async def test_given_no_dispatcher_holds_the_lane_open_then_an_offered_event_goes_by_the_broker_alone(
    records: JobRecords, topology: Topology
) -> None:
    job, event = _ending(topology, "http://127.0.0.1:9/hook")
    offer = await _recorded_with_offer(records, job, event)
    assert offer.pushed == frozenset()
    assert await records.pop_express(0.01) is None


async def test_given_an_open_lane_then_whichever_copy_comes_first_has_the_event(
    records: JobRecords, topology: Topology
) -> None:
    await records.open_express_lane(lease_s=5, for_s=5)
    first, first_event = _ending(topology, "http://127.0.0.1:9/hook")
    second, second_event = _ending(topology, "http://127.0.0.1:9/hook")
    assert (await _recorded_with_offer(records, first, first_event)).pushed == {first.id}
    assert (await _recorded_with_offer(records, second, second_event)).pushed == {second.id}

    # The first's broker copy comes before the lane pops it: the copy takes it back.
    assert await records.take_express(first.id, first_event.message.body) == "take"
    # The lane then has only the second; while it sends it, the copy is told to ask again.
    assert await records.pop_express(0.5) == second_event.message.body
    assert await records.pop_express(0.01) is None
    assert await records.take_express(second.id, second_event.message.body) == "pushed"
    await records.settle_express(second.id, "delivered")
    assert await records.take_express(second.id, second_event.message.body) == "delivered"
    # Read once: the mark is gone with it.
    assert await records.take_express(second.id, second_event.message.body) == "take"


async def test_given_a_lane_that_lost_its_event_then_the_copy_has_it_once_the_lease_is_over(
    records: JobRecords, topology: Topology
) -> None:
    await records.open_express_lane(lease_s=0.2, for_s=5)
    job, event = _ending(topology, "http://127.0.0.1:9/hook")
    await _recorded_with_offer(records, job, event)
    assert await records.pop_express(0.5) == event.message.body  # and its dispatcher dies

    async def taken() -> bool:
        return await records.take_express(job.id, event.message.body) == "take"

    await wait_until(taken, 5, "the copy to take the event after the lease")
    await records.settle_express(job.id, "delivered")  # a late lane writes nothing now
    assert await records.take_express(job.id, event.message.body) == "take"


async def test_given_a_lane_nobody_pops_then_it_holds_at_most_its_longest_list(
    records: JobRecords, topology: Topology
) -> None:
    await records.open_express_lane(lease_s=5, for_s=5)
    pushed = 0
    for _ in range(EXPRESS_LANE_LONGEST + 3):
        job, event = _ending(topology, "http://127.0.0.1:9/hook")
        pushed += len((await _recorded_with_offer(records, job, event)).pushed)
    assert pushed == EXPRESS_LANE_LONGEST


async def test_given_a_job_that_already_ended_then_its_late_ending_is_not_offered(
    records: JobRecords, topology: Topology
) -> None:
    await records.open_express_lane(lease_s=5, for_s=5)
    job, event = _ending(topology, "http://127.0.0.1:9/hook")
    await records.finish([(job, "failed", 1, None, "first")])
    offer = await _recorded_with_offer(records, job, event)
    assert offer.pushed == frozenset()
    assert await records.pop_express(0.01) is None


async def _submit(client: httpx.AsyncClient, receiver: CallbackReceiver, n: int) -> str:
    response = await client.post("/v1/models/echo/jobs", json={"input": n, "callback_url": receiver.url})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def _callback_state(client: httpx.AsyncClient, job_id: str) -> dict[str, object]:
    callback: dict[str, object] = (await client.get(f"/v1/jobs/{job_id}")).json()["callback"]
    return callback


async def _noted_delivered(client: httpx.AsyncClient, job_id: str) -> None:
    """Wait until the job's record shows its callback delivered."""

    async def noted() -> bool:
        return (await _callback_state(client, job_id))["state"] == "delivered"

    await wait_until(noted, 5, f"job {job_id}'s callback noted delivered")


async def _lone_jobs(client: httpx.AsyncClient, receiver: CallbackReceiver, count: int) -> list[str]:
    """`count` jobs, one at a time (each a batch of one), each called back and noted delivered."""
    ids = []
    for n in range(count):
        ids.append(await _submit(client, receiver, n))
        await receiver.wait_for(n + 1, timeout_s=10)
    for job_id in ids:
        await _noted_delivered(client, job_id)
    return ids


def _express_count(sink: PrometheusSink, outcome: str) -> float:
    return sink.registry.get_sample_value("inferq_callbacks_express_total", {"outcome": outcome}) or 0.0


@asynccontextmanager
async def _running(
    settings: CallbackSettings, broker: Broker, sink: PrometheusSink
) -> AsyncIterator[ExpressLane]:
    """A dispatcher with its lane open; once it stopped, no copy is left on the callbacks
    queue (one it had not acked would be back there)."""
    dispatcher = CallbackDispatcher(settings, metrics=DeliveryMetrics(sink))
    await dispatcher.start()
    try:
        lane = dispatcher.express
        assert lane is not None
        await wait_until(lambda: lane.is_open, 5, "the lane open")
        yield lane
    finally:
        await dispatcher.stop()
    assert (await broker.queue_depth(broker.topology.callbacks_queue))[0] == 0


async def test_given_lone_jobs_at_low_load_then_each_callback_comes_by_the_lane_once(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    broker: Broker,
) -> None:
    sink = PrometheusSink(CALLBACK_SERIES)
    async with (
        _running(callback_settings, broker, sink) as lane,
        running_worker(EchoModel(), worker_settings),
    ):
        ids = await _lone_jobs(client, receiver, 5)
        for job_id in ids:
            assert (await _callback_state(client, job_id))["attempts"] == 1

    assert lane.sent == 5
    assert _express_count(sink, "delivered") == 5
    assert receiver.requests_seen == 5  # the copies, acked, sent nothing
    assert sorted(r.event["data"]["id"] for r in receiver.received) == sorted(ids)
    assert all(r.verified for r in receiver.received)


async def test_given_the_lanes_attempt_fails_then_the_broker_copy_retries_it_as_its_second(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    broker: Broker,
) -> None:
    receiver.scripted_statuses.append(503)
    sink = PrometheusSink(CALLBACK_SERIES)
    async with (
        _running(callback_settings, broker, sink) as lane,
        running_worker(EchoModel(), worker_settings),
    ):
        job_id = await _submit(client, receiver, 1)
        [delivered] = await receiver.wait_for(1, timeout_s=10)
        await _noted_delivered(client, job_id)

    assert delivered.event["data"]["id"] == job_id
    assert receiver.requests_seen == 2  # the lane's 503, then the copy's retry: not a third
    assert lane.sent == 0
    assert _express_count(sink, "failed") == 1
    assert (await _callback_state(client, job_id))["attempts"] == 2


async def test_given_a_copy_whose_lane_died_with_the_event_then_the_copy_sends_it_once_after_the_lease(
    callback_settings: CallbackSettings, records: JobRecords, broker: Broker, receiver: CallbackReceiver
) -> None:
    """A dispatcher popped the event and died: the copy, on another dispatcher, waits out
    the mark's lease and sends it itself."""
    await records.open_express_lane(lease_s=0.3, for_s=5)
    job, event = _ending(broker.topology, receiver.url)
    await _recorded_with_offer(records, job, event)
    pushed_at = time.monotonic()
    assert await records.pop_express(0.5) == event.message.body
    copy = expressed(event)
    await broker.publish(copy.message, copy.routing_key)

    sink = PrometheusSink(CALLBACK_SERIES)
    dispatcher = CallbackDispatcher(callback_settings, metrics=DeliveryMetrics(sink))
    await dispatcher.start()
    try:
        [received] = await receiver.wait_for(1, timeout_s=10)
        await wait_until(lambda: not dispatcher.slots.hosts_tracked, 5, "the copy settled")
    finally:
        await dispatcher.stop()
    assert received.event["data"]["id"] == job.id
    assert received.received_monotonic_s - pushed_at >= 0.25  # it waited for the lane's outcome
    assert receiver.requests_seen == 1
    assert dispatcher.express is not None and dispatcher.express.sent == 0
    assert _express_count(sink, "by_copy") == 1


async def test_given_two_dispatchers_and_a_slow_receiver_then_each_lone_job_is_called_back_once(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    broker: Broker,
) -> None:
    """Two dispatchers: a copy often reaches the one whose lane is not sending its event,
    and asks Redis again until the other's outcome is there. The receiver answers after
    0.2 s, so every copy arrives while its lane's POST is under way."""
    receiver.response_delay_s = 0.2
    sink = PrometheusSink(CALLBACK_SERIES)
    async with (
        _running(callback_settings, broker, sink) as first,
        _running(callback_settings, broker, sink) as second,
        running_worker(EchoModel(), worker_settings),
    ):
        ids = await _lone_jobs(client, receiver, 6)

    assert first.sent + second.sent == 6
    assert _express_count(sink, "delivered") == 6
    assert receiver.requests_seen == 6  # no copy sent its event again
    assert sorted(r.event["data"]["id"] for r in receiver.received) == sorted(ids)
