"""Losing nothing under failure: retry tiers, parking and replay, the model breaker,
deadlines, and callback delivery that retries without running the model again.
Real broker, real receiver; the model is a switchable test double."""

from __future__ import annotations

import ipaddress
import itertools
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from job_records.store import JobRecords
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from parking_lot.lots import ParkingLot, inspect, replay
from policies.callback_guard import AllowList, IPAddress, SystemResolver
from policies.circuit_breaker import BreakerState
from ray_workers.settings import WorkerSettings
from tests.conftest import TEST_JOB_RETRIES, running_worker, wait_until
from tests.models import RecordingModel
from wire.envelope import HISTORY_HEADER, PARK_REASON_HEADER, Job
from wire.job_message import job_message


async def _submit(client: httpx.AsyncClient, callback_url: str, job_input: Any = "x", **extra: Any) -> str:
    response = await client.post(
        "/v1/models/echo/jobs", json={"input": job_input, "callback_url": callback_url, **extra}
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _job(callback_url: str) -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input="fast",
        callback_url=callback_url,
        submitted_at_ms=int(time.time() * 1000),
    )


async def test_given_a_transient_failure_then_each_retry_waits_its_tier_and_attempt_3_succeeds(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    model = RecordingModel(fail_until_attempt=3)
    async with running_worker(model, worker_settings):
        job_id = await _submit(client, receiver.url)
        received = await receiver.wait_for(1, timeout_s=15)

    event = received[0].event
    assert (event["type"], event["data"]["id"], event["data"]["attempts"]) == ("job.succeeded", job_id, 3)
    assert [b.attempts for b in model.batches] == [(1,), (2,), (3,)]
    waits = [
        later.at_monotonic_s - earlier.at_monotonic_s for earlier, later in itertools.pairwise(model.batches)
    ]
    for waited, tier in zip(waits, TEST_JOB_RETRIES.delays_s, strict=True):
        # Jitter shortens a wait by at most 10 %; delivery adds a little on top.
        assert tier * 0.9 - 0.02 <= waited <= tier + 0.5, f"waited {waited:.3f} s for a {tier} s tier"
    measured = [round(w, 3) for w in waits]
    print(f"\nretry-delay accuracy: tiers {TEST_JOB_RETRIES.delays_s} s, waited {measured} s")


async def test_given_a_model_that_keeps_failing_then_the_job_is_parked_called_back_and_replayable(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    broker: Broker,
    redis_url: str,
) -> None:
    model = RecordingModel(healthy=False)
    async with running_worker(model, worker_settings):
        job_id = await _submit(client, receiver.url, {"keep": "me"})
        failed = (await receiver.wait_for(1, timeout_s=15))[0]
        lot = ParkingLot(worker_settings.topology, "echo")
        report = await inspect(broker, lot)

        model.healthy = True  # the cause is removed
        records = JobRecords(redis_url, worker_settings.topology.prefix, ttl_s=60)
        try:
            assert (await replay(broker, lot, ids=[job_id], records=records)).moved == 1
        finally:
            await records.close()
        succeeded = (await receiver.wait_for(2, timeout_s=15))[1]

    assert failed.event["type"] == "job.failed" and failed.event["data"]["attempts"] == 3
    assert "model is down" in failed.event["data"]["error"]
    assert report.count == 1 and report.sample[0][0] == job_id
    assert report.sample[0][1] == "failed after 3 attempt(s)"
    assert succeeded.event["type"] == "job.succeeded"
    assert succeeded.event["data"]["id"] == job_id and succeeded.event["data"]["output"] == {"keep": "me"}
    assert succeeded.event["data"]["attempts"] == 1
    assert (await inspect(broker, lot)).count == 0


async def test_given_a_permanent_error_then_parked_at_once_with_its_history(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    broker: Broker,
) -> None:
    from ray_workers.models.synthetic import SyntheticModel

    async with running_worker(SyntheticModel(), worker_settings):
        response = await client.post(
            "/v1/models/synthetic/jobs",
            json={"input": {"fail_permanently": True}, "callback_url": receiver.url},
        )
        job_id = response.json()["id"]
        callback = (await receiver.wait_for(1, timeout_s=15))[0]

    assert callback.event["type"] == "job.failed" and callback.event["data"]["attempts"] == 1
    async with broker.fetching(worker_settings.topology.parking_queue("synthetic")) as next_message:
        parked = await next_message()
    assert parked is not None and parked.message_id == job_id
    assert parked.headers[PARK_REASON_HEADER] == "permanent error"
    history = json.loads(parked.headers[HISTORY_HEADER])
    assert [entry["attempt"] for entry in history] == [1]
    assert "fail_permanently" in history[0]["error"]


async def test_given_a_failing_model_then_the_breaker_stops_consuming_and_recovers_via_half_open(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    broker: Broker,
) -> None:
    settings = replace(
        worker_settings, batching=Batching(max_size=1), breaker_failure_threshold=2, breaker_cooldown_s=1.5
    )
    model = RecordingModel(healthy=False)
    queue = settings.topology.main_queue("echo")
    async with running_worker(model, settings) as worker:
        job_ids = [await _submit(client, receiver.url, n) for n in range(6)]

        # Phase 1: two failed batches open the breaker; the replica stops consuming and
        # the other jobs wait in the queue with their attempts unspent.
        async def opened_and_handed_back() -> bool:
            # The breaker opens first; the consumer is cancelled once the batch has settled,
            # and its prefetched jobs are back once its channel has closed (a moment later).
            open_now = worker.breaker.state is BreakerState.OPEN
            ready, consumers = await broker.queue_depth(queue)
            return open_now and consumers == 0 and ready >= 4

        await wait_until(opened_and_handed_back, 10, "the breaker open, its consumer gone, 4 jobs back")
        assert not worker.is_consuming
        assert model.calls == 2

        # Phase 2: after the cool-down one probe runs; it fails, so the breaker opens again.
        await wait_until(lambda: model.calls == 3, 10, "the half-open probe")
        await wait_until(lambda: worker.breaker.state is BreakerState.OPEN, 5, "the breaker to reopen")

        # Phase 3: the model recovers; the next probe closes the breaker and all jobs finish.
        model.healthy = True
        received = await receiver.wait_for(6, timeout_s=20)

    assert worker.breaker.state is BreakerState.CLOSED
    assert {r.event["data"]["id"] for r in received} == set(job_ids)
    assert all(r.event["type"] == "job.succeeded" for r in received)
    # Only the jobs that ran while the model failed spent attempts.
    assert sum(r.event["data"]["attempts"] > 1 for r in received) == 3


async def test_given_a_deadline_that_passed_in_the_queue_then_job_expired_and_the_model_never_runs(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    expiring = await _submit(client, receiver.url, ttl_s=0.05)
    lasting = await _submit(client, receiver.url, ttl_s=600)
    deadline_s = time.time() + 0.05
    await wait_until(lambda: time.time() > deadline_s, 5, "the short deadline to pass")
    model = RecordingModel()
    async with running_worker(model, worker_settings):
        received = await receiver.wait_for(2, timeout_s=15)

    types = {r.event["data"]["id"]: r.event["type"] for r in received}
    assert types == {expiring: "job.expired", lasting: "job.succeeded"}
    assert [b.attempts for b in model.batches] == [(1,)]


async def test_given_a_callback_target_down_then_up_then_delivered_once_with_the_same_id_and_one_model_run(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    receiver.scripted_statuses.extend([503, 502])
    model = RecordingModel()
    async with running_worker(model, worker_settings):
        job_id = await _submit(client, receiver.url)
        received = await receiver.wait_for(1, timeout_s=15)

    assert receiver.requests_seen == 3
    assert received[0].webhook_id == f"msg_{job_id}_succeeded" and received[0].verified
    assert model.calls == 1


async def test_given_a_target_that_never_answers_then_another_targets_callback_does_not_wait_behind_it(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    broker: Broker,
    webhook_secret: str,
) -> None:
    # The second target is another host name on the same loopback address, pinned by an
    # injected resolver (no reliance on what `localhost` resolves to on this machine).
    async def resolve(host: str, port: int) -> list[IPAddress]:
        if host == "healthy.test":
            return [ipaddress.ip_address("127.0.0.1")]
        return await SystemResolver()(host, port)

    settings = replace(
        callback_settings,
        callback_timeout_s=60.0,  # the slow target's deliveries stay in flight for the whole test
        callback_host_concurrency=4,
        callback_allow=AllowList.parse(["127.0.0.1", "healthy.test"]),
    )
    stage = CallbackDispatcher(settings, resolve=resolve)
    await stage.start()
    receiver.response_delay_s = 120.0  # never answers
    healthy = CallbackReceiver(webhook_secret)
    await healthy.start()
    try:
        async with running_worker(RecordingModel(), worker_settings):
            for n in range(20):
                await _submit(client, receiver.url, n)
            await wait_until(lambda: receiver.requests_seen >= 4, 10, "the slow target's slots to be taken")
            fast = _job(healthy.url.replace("127.0.0.1", "healthy.test"))
            await broker.publish(job_message(fast), "echo", exchange=worker_settings.topology.jobs_exchange)
            received = await healthy.wait_for(1, timeout_s=10)
            slow_answered = len(receiver.received)
    finally:
        await stage.stop(drain_timeout_s=0)
        await healthy.stop()

    assert received[0].event["data"]["id"] == fast.id
    assert received[0].verified
    # Delivered while every one of the slow target's callbacks was still waiting: the
    # healthy host did not queue behind them (their timeout is 60 s, the wait above 10 s).
    assert slow_answered == 0
    assert receiver.max_concurrent == 4
