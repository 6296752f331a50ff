"""Regression tests for the budgets issue's review findings that have no better home
(the item number is in each test's docstring). Real Redis, real broker."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import redis.asyncio

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from ingress.pending_records import PendingRecords
from ingress.record_creation import RecordCreation
from ingress.settings import IngressSettings
from job_records.store import JobRecords, RecordsUnavailable
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from policies.callback_guard import AllowList
from ray_workers.settings import WorkerSettings
from tests.conftest import (
    callbacks_in,
    drain_queue,
    queue_holds,
    running_ingress,
    running_worker,
    wait_until,
)
from tests.models import RecordingModel, UnencodableModel
from wire.callback_events import callback_for, carrying_job
from wire.envelope import ATTEMPT_HEADER, PARK_REASON_HEADER, Job, JobTimings
from wire.job_message import job_message


def _job(**fields: object) -> Job:
    fields.setdefault("input", None)
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        submitted_at_ms=int(time.time() * 1000),
        **fields,  # type: ignore[arg-type]
    )


async def test_given_a_record_batch_failing_with_any_error_then_every_request_in_it_is_answered(
    redis_url: str,
) -> None:
    """Item 14: only RecordsUnavailable was passed on; any other error left every request of
    the batch waiting forever. Metadata Redis's encoder cannot take fails the whole call."""
    records = JobRecords(redis_url, f"t{uuid.uuid4().hex[:10]}.", ttl_s=60)
    creation = RecordCreation(records)
    try:
        both = asyncio.gather(
            creation.create(_job(metadata={"bad": object()})),
            creation.create(_job()),
            return_exceptions=True,
        )
        outcomes = await asyncio.wait_for(both, 5)
    finally:
        await records.close()

    assert [type(outcome) for outcome in outcomes] == [RecordsUnavailable, RecordsUnavailable]


async def test_given_unencodable_outputs_and_a_bad_attempt_header_then_those_jobs_fail_and_the_loop_goes_on(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Item 7: an output that cannot be encoded or a bad x-attempt header ended the worker's
    job loop (Serve restarts the replica; the redelivered batch ends the next one). Now each
    such job fails permanently with its reason, and the jobs beside it and after it run."""
    settings = replace(worker_settings, batching=Batching(adaptive=False, max_size=8))
    callback = {"callback_url": "http://127.0.0.1:9/"}
    complex_job, deep_job, fine = (_job(input=v, **callback) for v in ("complex", "deep", "fine"))
    bad_header = _job(input="fine", **callback)
    exchange = broker.topology.jobs_exchange
    for job in (complex_job, deep_job, fine):
        await broker.publish(job_message(job), "echo", exchange=exchange)
    await broker.publish(job_message(bad_header, {ATTEMPT_HEADER: "abc"}), "echo", exchange=exchange)
    seen: dict[str, tuple[str, str | None]] = {}

    async def events(count: int) -> bool:
        for callback in callbacks_in(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)):
            seen[callback.event.data.id] = (callback.event.type, callback.event.data.error)
        return len(seen) >= count

    async with running_worker(UnencodableModel(), settings) as worker:
        await wait_until(lambda: events(3), 20, "three callbacks")
        after = _job(input="after", **callback)
        await broker.publish(job_message(after), "echo", exchange=exchange)
        await wait_until(lambda: events(4), 20, "the next job's callback")
        assert worker.is_alive

    assert seen[fine.id] == ("job.succeeded", None)
    assert seen[after.id] == ("job.succeeded", None)
    for job in (complex_job, deep_job):
        event_type, error = seen[job.id]
        assert event_type == "job.failed" and "cannot be encoded" in str(error)
    parked = await drain_queue(settings.amqp_url, settings.topology.parking_queue("echo"))
    reasons = {m.message_id: str(m.headers[PARK_REASON_HEADER]) for m in parked}
    assert set(reasons) == {complex_job.id, deep_job.id, bad_header.id}
    assert "x-attempt" in reasons[bad_header.id]


async def test_given_an_output_over_the_record_cap_then_the_record_keeps_its_size_not_the_output(
    redis_url: str,
) -> None:
    """Item 3 (bytes bound Redis): records lived 24 h with outputs of any size; about 1,000
    large ones filled Redis. An output over RECORD_OUTPUT_MAX_BYTES goes by callback only."""
    records = JobRecords(redis_url, f"t{uuid.uuid4().hex[:10]}.", ttl_s=60, max_output_bytes=1000)
    small, large = _job(), _job()
    try:
        await records.create([small, large])
        await records.finish(
            [(small, "succeeded", 1, "x" * 100, None), (large, "succeeded", 1, "y" * 5000, None)]
        )
        kept, omitted = await records.get(small.id), await records.get(large.id)
    finally:
        await records.close()

    assert kept is not None and kept.output == "x" * 100 and kept.output_omitted_bytes is None
    assert omitted is not None and omitted.status == "succeeded"
    assert omitted.output is None and omitted.output_omitted_bytes == 5002


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of its own, capped at 2 MB with noeviction as the stack runs it, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--maxmemory", "2mb", "--maxmemory-policy", "noeviction", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if time.monotonic() > deadline:
                raise AssertionError("the capped redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


async def test_given_redis_full_then_keyed_submissions_answer_503_at_once_and_redis_keeps_serving(
    full_redis: str, ingress_settings: IngressSettings
) -> None:
    """Item 3: with maxmemory and noeviction a full Redis refuses writes; the ingress answers
    503 + Retry-After fast for what needs a record, and Redis itself stays up."""
    for size in (100_000, 1000):  # large outputs first, then small ones until over the cap
        records = JobRecords(full_redis, "fill.", ttl_s=600, max_output_bytes=1 << 20)
        try:
            with pytest.raises(RecordsUnavailable):
                for _ in range(10_000):
                    await records.finish([(_job(), "succeeded", 1, "z" * size, None)])
        finally:
            await records.close()
    settings = replace(ingress_settings, redis_url=full_redis)

    async with running_ingress(settings) as client:
        started = time.monotonic()
        response = await client.post(
            "/v1/models/echo/jobs", json={"input": 1}, headers={"Idempotency-Key": "full-redis"}
        )
        elapsed_s = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert elapsed_s < 2
    assert _answers(int(full_redis.rsplit(":", 1)[1].split("/")[0]))


async def test_given_redis_away_then_pending_records_are_bounded_by_bytes_dropping_the_oldest() -> None:
    """Buffers bound by bytes: records waiting for Redis were bounded by count (100,000 jobs,
    each with metadata up to the body limit)."""
    away = JobRecords("redis://127.0.0.1:1/0", "t.", ttl_s=60, timeout_s=0.2)
    pending = PendingRecords(away, max_bytes=50_000)
    jobs = [_job(metadata={"blob": "m" * 10_000}) for _ in range(20)]
    try:
        for job in jobs:
            pending.add(job)
        held = [job for job in jobs if pending.get(job.id) is not None]
        assert 40_000 <= pending.held_bytes <= 50_000
        assert held == jobs[-len(held) :]  # the newest kept, the oldest left to the worker
    finally:
        await pending.close()
        await away.close()


async def test_given_redis_back_then_pending_records_are_written_in_batches(redis_url: str) -> None:
    """Item 13: pending records were flushed one per round trip, so another replica answered
    404 for accepted jobs for as long as that took."""
    records = JobRecords(redis_url, f"t{uuid.uuid4().hex[:10]}.", ttl_s=60)
    pending = PendingRecords(records)
    jobs = [_job() for _ in range(600)]
    try:
        for job in jobs:
            pending.add(job)
        await wait_until(lambda: pending.held_bytes == 0, 10, "the pending records written")
        stored = [await records.get(job.id) for job in jobs]
    finally:
        await pending.close()
        await records.close()

    assert all(record is not None and record.status == "queued" for record in stored)


async def test_given_large_jobs_then_a_batch_holds_at_most_its_bytes(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    """Buffers bound by bytes: a batch was bounded by count only, so 128 jobs of 1 MiB made
    one batch (decoded, tens of MB each for object-heavy inputs)."""
    settings = replace(
        worker_settings,
        batching=Batching(adaptive=False, max_size=8),
        batch_max_bytes=1_000_000,
        prefetch_max_bytes=2_000_000,
    )
    jobs = [_job(input="x" * 300_000, callback_url="http://127.0.0.1:9/") for _ in range(12)]
    for job in jobs:
        await broker.publish(job_message(job), "echo", exchange=broker.topology.jobs_exchange)
    model = RecordingModel()

    async with running_worker(model, settings):
        await wait_until(lambda: sum(len(b.attempts) for b in model.batches) == 12, 30, "every job run")

    assert max(len(batch.attempts) for batch in model.batches) <= 4


async def test_given_many_hosts_that_failed_then_their_breakers_are_forgotten_a_cooldown_later(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    """Item 16: the dispatcher kept a breaker for every host that ever failed once. Twenty
    loopback hosts with nothing listening fail until parked; a cool-down later, a delivery
    to a host that answers finds none of their breakers left."""
    settings = replace(
        callback_settings,
        callback_allow=AllowList.parse(["127.0.0.0/8"]),
        callback_breaker_cooldown_s=0.3,
    )
    topology = settings.topology

    async def publish(url: str) -> str:
        job = _job(callback_url=url)
        timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
        event = callback_for(job, "succeeded", 1, timings, 0.0, topology)
        await broker.publish(event.message, event.routing_key, exchange=event.exchange)
        return job.id

    dispatcher = CallbackDispatcher(settings)
    await dispatcher.start()
    try:
        for n in range(2, 22):
            await publish(f"http://127.0.0.{n}:9/hook")
        parking = topology.callbacks_parking_queue
        await wait_until(lambda: queue_holds(settings.amqp_url, parking, 20), 20, "the twenty parked")
        peak = dispatcher.breaker_hosts

        async def good_delivery_leaves_no_breakers() -> bool:
            await publish(receiver.url)
            await wait_until(lambda: len(receiver.received) > 0, 5, "a good delivery")
            receiver.received.clear()
            return dispatcher.breaker_hosts == 0

        await wait_until(good_delivery_leaves_no_breakers, 10, "the failed hosts' breakers forgotten")
    finally:
        await dispatcher.stop()

    assert peak > 0


async def test_given_a_job_that_may_wait_days_then_its_record_and_key_outlive_its_wait(
    redis_url: str,
) -> None:
    """Item 10: records and keys lived RESULT_TTL_S (24 h) while a job may wait up to 7 days
    (ttl_s): a long-queued job answered 404, could not be canceled, and its key lapsed."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    records = JobRecords(redis_url, prefix, ttl_s=3600)
    now_ms = int(time.time() * 1000)
    waiting, plain = _job(deadline_ms=now_ms + 5 * 24 * 3600 * 1000), _job()
    store = redis.asyncio.Redis.from_url(redis_url)
    try:
        await records.create([waiting, plain])
        await records.reserve_key(waiting.owner, "k", "fingerprint", waiting.id)
        await records.complete_key(waiting.owner, "k", waiting.id, 202, records.ttl_for(waiting))
        record_ttls = [await store.ttl(f"{prefix}inferq:job:{job.id}") for job in (waiting, plain)]
        key_ttls = [await store.ttl(key) async for key in store.scan_iter(match=f"{prefix}inferq:idem:*")]
    finally:
        await store.aclose()
        await records.close()

    five_days_s = 5 * 24 * 3600
    assert record_ttls[0] >= 3600 + five_days_s - 5
    assert 3590 <= record_ttls[1] <= 3600
    assert key_ttls and key_ttls[0] >= 3600 + five_days_s - 5


async def test_given_a_publish_not_confirmed_then_a_retry_with_its_key_sends_the_same_job_not_a_second(
    ingress_settings: IngressSettings,
) -> None:
    """Item 8: a confirm that timed out answered 503 and released the Idempotency-Key,
    although the message may be queued; the client's retry with the same key made a second
    job. Now the key stays with the job, and the retry sends the same id again."""
    body = {"input": 1, "callback_url": "http://127.0.0.1:9/"}
    keyed = {"Idempotency-Key": "uncertain-1"}
    no_time_to_confirm = replace(ingress_settings, publish_timeout_s=1e-6)
    async with running_ingress(no_time_to_confirm) as client:
        first = await client.post("/v1/models/echo/jobs", json=body, headers=keyed)
    async with running_ingress(ingress_settings) as client:
        second = await client.post("/v1/models/echo/jobs", json=body, headers=keyed)
        status = await client.get(f"/v1/jobs/{second.json()['id']}")

    assert first.status_code == 503, first.text
    assert first.json()["type"].endswith("publish-uncertain") and first.headers["retry-after"]
    assert second.status_code == 202, second.text
    assert second.json()["id"] == first.json()["job_id"]
    assert status.status_code == 200
    queued = await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo"))
    assert 1 <= len(queued) <= 2
    assert {m.message_id for m in queued} == {first.json()["job_id"]}


async def test_given_a_cancel_whose_answer_was_lost_then_the_repeated_cancel_sends_job_canceled(
    client: httpx.AsyncClient, ingress_settings: IngressSettings, redis_url: str
) -> None:
    """Item 12: Redis ran the cancel, then its answer was lost (the client got 503 and no
    job.canceled went out); the next cancel said 409 and sent nothing, so the callback was
    lost. Here the cancel is run straight on the record, as the lost request left it."""
    submitted = await client.post(
        "/v1/models/echo/jobs", json={"input": 1, "callback_url": "http://127.0.0.1:9/"}
    )
    job_id = submitted.json()["id"]
    records = JobRecords(redis_url, ingress_settings.topology.prefix, ttl_s=60)
    try:
        record = await records.get(job_id)
        assert record is not None
        assert await records.cancel(record) == (True, "canceled")
    finally:
        await records.close()

    again = await client.post(f"/v1/jobs/{job_id}/cancel")

    assert again.status_code == 409 and again.json()["job_status"] == "canceled"
    callbacks = callbacks_in(
        await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.callbacks_queue)
    )
    assert [(c.event.type, c.event.data.id) for c in callbacks] == [("job.canceled", job_id)]


async def test_given_a_worker_without_redis_then_the_dispatcher_sends_only_the_ending_the_records_kept(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver, redis_url: str
) -> None:
    """Item 6: an event whose worker could not reach Redis carries its job, and the dispatcher
    records its ending, but it delivered the event whatever the record said: a job canceled
    meanwhile got job.succeeded after job.canceled. Only the recorded ending is sent."""
    topology = callback_settings.topology
    canceled, fine = _job(callback_url=receiver.url), _job(callback_url=receiver.url)
    records = JobRecords(redis_url, topology.prefix, ttl_s=60)
    try:
        await records.create([canceled, fine])
        record = await records.get(canceled.id)
        assert record is not None and (await records.cancel(record))[0]
    finally:
        await records.close()
    timings = JobTimings(queued_ms=0, inference_ms=1, batch_size=1)
    for job in (canceled, fine):
        event = carrying_job(callback_for(job, "succeeded", 1, timings, time.time(), topology, output=1), job)
        await broker.publish(event.message, event.routing_key, exchange=event.exchange)

    dispatcher = CallbackDispatcher(callback_settings)
    await dispatcher.start()
    try:
        await receiver.wait_for(1, timeout_s=10)
        await wait_until(
            lambda: queue_holds(callback_settings.amqp_url, topology.callbacks_queue, 0), 10, "acked"
        )
    finally:
        await dispatcher.stop()

    assert [c.event["data"]["id"] for c in receiver.received] == [fine.id]


@pytest.mark.slow
async def test_given_a_records_outage_then_another_replica_answers_record_pending_not_404_until_it_is_written(
    ingress_settings: IngressSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 13: while a replica held an accepted job's record in memory (Redis was away),
    another replica answered 404 for it once Redis was back: "not known" taken for "not
    found". Two ingress apps on a Redis of their own, stopped and started again. The grace
    is shortened to 8 s (past the 5 s a replica skips Redis after a failure)."""
    monkeypatch.setattr("ingress.job_routes.RECORD_PENDING_GRACE_S", 8.0, raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = (
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        str(tmp_path),
    )
    settings = replace(ingress_settings, redis_url=f"redis://127.0.0.1:{port}/0")
    server = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
    try:
        await wait_until(lambda: _answers(port), 10, "Redis up")
        async with running_ingress(settings) as accepting, running_ingress(settings) as other:
            server.terminate()
            await server.wait()
            submitted = await accepting.post(
                "/v1/models/echo/jobs", json={"input": 1, "callback_url": "http://127.0.0.1:9/"}
            )
            assert submitted.status_code == 202, submitted.text
            job = f"/v1/jobs/{submitted.json()['id']}"
            assert (await other.get(job)).status_code == 503  # Redis away: unavailable, as before
            server = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL)
            await wait_until(lambda: _answers(port), 10, "Redis up again")

            async def unknown_job() -> httpx.Response:
                return await other.get(f"/v1/jobs/{uuid.uuid4()}")

            async def reads_redis_again() -> bool:
                answer = await unknown_job()
                return answer.status_code != 503 or answer.json()["type"].endswith("record-pending")

            await wait_until(reads_redis_again, 15, "the other replica reading Redis again")
            pending = await unknown_job()
            await wait_until(lambda: _status_is(other, job, 200), 20, "the accepted job's record written")
            await wait_until(lambda: _status_is(other, f"/v1/jobs/{uuid.uuid4()}", 404), 15, "404 again")
    finally:
        server.terminate()
        await server.wait()

    assert pending.status_code == 503 and pending.json()["type"].endswith("record-pending")
    assert pending.headers["retry-after"]


async def _status_is(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status
