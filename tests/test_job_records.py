"""The job records against the real Redis: the state machine is monotonic, the first
terminal write wins, cancel and start have one winner, and placement counts what waits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from job_records.store import CANCEL_HANDOFF_S, JobRecord, JobRecords, RecordsUnavailable
from wire.envelope import Job, Priority


def _job(priority: Priority = "normal", callback_url: str | None = "http://127.0.0.1:9/cb") -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input=1,
        callback_url=callback_url,
        priority=priority,
        submitted_at_ms=1_000,
        owner="owner-a",
    )


@pytest.fixture
async def records(redis_url: str) -> AsyncIterator[JobRecords]:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    store = JobRecords(redis_url, prefix, ttl_s=60)
    yield store
    await store.close()
    client = redis.asyncio.Redis.from_url(redis_url)
    async with client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)


async def test_given_a_created_job_then_it_reads_queued_with_its_fields(records: JobRecords) -> None:
    job = _job()
    placement = (await records.create([job]))[0]

    record = await records.get(job.id)

    assert record is not None and record.status == "queued"
    assert (record.model, record.priority, record.owner) == ("echo", "normal", "owner-a")
    assert record.callback_url == job.callback_url and record.delivery == "pending"
    assert placement.queue_position == 1
    assert await records.get("no-such-job") is None


async def test_given_two_copies_ending_differently_then_the_first_finish_wins_for_both(
    records: JobRecords,
) -> None:
    one, two = _job(), _job()
    first = await records.finish([(one, "succeeded", 1, {"out": 1}, None), (two, "failed", 3, None, "boom")])
    second = await records.finish([(one, "failed", 2, None, "late"), (two, "succeeded", 4, "late", None)])

    assert first == {one.id: "succeeded", two.id: "failed"}
    assert second == first
    record = await records.get(one.id)
    assert record is not None and record.output == {"out": 1} and record.error is None
    assert record.owner == "owner-a"  # written from the job itself: no create came first


async def test_given_racing_finishes_then_exactly_one_wins(records: JobRecords) -> None:
    job = _job()
    statuses = ["succeeded", "failed", "expired"] * 10
    results = await asyncio.gather(*(records.finish([(job, s, 1, None, "x")]) for s in statuses))

    assert len({result[job.id] for result in results}) == 1  # every claimant was told the same winner


async def test_given_a_finished_job_then_start_answers_its_status_and_does_not_reopen_it(
    records: JobRecords,
) -> None:
    job = _job()
    await records.create([job])
    assert (await records.start([(job, 1)], now_ms=2_000))[job.id].status == "running"
    await records.finish([(job, "succeeded", 1, "out", None)])

    assert (await records.start([(job, 1)], now_ms=3_000))[job.id].status == "succeeded"
    record = await records.get(job.id)
    assert record is not None and record.status == "succeeded" and record.started_ms == 2_000


async def test_given_start_and_finish_in_one_call_then_each_job_reads_as_after_start_then_finish(
    records: JobRecords,
) -> None:
    fresh, canceled, done, retrying = _job(), _job(), _job(), _job()
    await records.create([fresh, canceled, done, retrying])
    assert (await records.cancel(await _record(records, canceled), now_ms=1_500)) == (True, "canceled")
    await records.finish([(done, "succeeded", 1, "before", None)])
    endings = [(job, "succeeded", 2, f"ran {n}", None) for n, job in enumerate((fresh, canceled, done))]

    started, recorded = await records.start_and_finish(
        [(fresh, 2), (canceled, 2), (done, 2), (retrying, 2)], 2_000, endings
    )

    assert [started[job.id].status for job in (fresh, canceled, done, retrying)] == [
        "running",
        "canceled",
        "succeeded",
        "running",
    ]
    assert started[done.id].output == "before"  # what a redelivered copy sends again
    assert recorded == {fresh.id: "succeeded", canceled.id: "canceled", done.id: "succeeded"}
    read = {job.id: await _record(records, job) for job in (fresh, canceled, done, retrying)}
    assert (read[fresh.id].status, read[fresh.id].output, read[fresh.id].attempts) == (
        "succeeded",
        "ran 0",
        2,
    )
    assert (read[fresh.id].started_ms, read[retrying.id].started_ms) == (2_000, 2_000)
    assert (read[canceled.id].status, read[canceled.id].output) == ("canceled", None)
    assert read[done.id].output == "before"
    assert (read[retrying.id].status, read[retrying.id].attempts) == ("running", 2)
    assert await records.start_and_finish([], 3_000, []) == ({}, {})
    assert (await records.start_and_finish([(_job(), 1)], 3_000, []))[1] == {}


async def _record(records: JobRecords, job: Job) -> JobRecord:
    record = await records.get(job.id)
    assert record is not None
    return record


async def test_given_cancel_racing_start_then_exactly_one_wins(records: JobRecords) -> None:
    jobs = [_job() for _ in range(40)]
    for job in jobs:
        await records.create([job])
    created = {job.id: await records.get(job.id) for job in jobs}

    async def cancel(job: Job) -> bool:
        record = created[job.id]
        assert record is not None
        won, _status = await records.cancel(record)
        return won

    cancels = await asyncio.gather(
        *(cancel(job) for job in jobs[::2]), records.start([(j, 1) for j in jobs], 5)
    )
    started = cancels[-1]
    assert isinstance(started, dict)
    for job, outcome in zip(jobs[::2], cancels[:-1], strict=True):
        assert outcome != (started[job.id].status == "running"), job.id
        if outcome:  # the ingress sends job.canceled, not the worker
            assert not started[job.id].owes_canceled_callback(now_ms=started[job.id].finished_ms + 1)
    assert all(started[job.id].status == "running" for job in jobs[1::2])


async def test_given_a_cancel_handed_over_or_overdue_then_the_worker_owes_its_callback(
    records: JobRecords,
) -> None:
    handed, overdue = _job(), _job()
    for job in (handed, overdue):
        await records.create([job])
        record = await records.get(job.id)
        assert record is not None and (await records.cancel(record))[0]
    await records.hand_cancel_to_worker(handed.id)

    found = await records.start([(handed, 1), (overdue, 1)], now_ms=0)
    finished_ms = found[overdue.id].finished_ms

    assert found[handed.id].owes_canceled_callback(now_ms=finished_ms)
    assert not found[overdue.id].owes_canceled_callback(now_ms=finished_ms + 1_000)
    assert found[overdue.id].owes_canceled_callback(now_ms=finished_ms + (CANCEL_HANDOFF_S + 1) * 1000)


async def test_given_delivery_states_then_each_record_keeps_its_own_and_a_missing_one_expires(
    records: JobRecords, redis_url: str
) -> None:
    known, late = _job(), _job()
    await records.create([known])

    await records.record_delivery([(known.id, "delivered", 2), (late.id, "parked", 5)])

    record = await records.get(known.id)
    assert record is not None and record.status == "queued"
    assert (record.delivery, record.delivery_attempts) == ("delivered", 2)
    assert await records.get(late.id) is None  # a note alone is not a record
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        [key] = [key async for key in client.scan_iter(match=f"*{late.id}")]
        assert await client.hgetall(key) == {"delivery": "parked", "delivery_attempts": "5"}
        assert 0 < await client.ttl(key) <= 60
    await records.finish([(late, "failed", 5, None, "boom")])
    ended = await records.get(late.id)
    assert ended is not None and ended.status == "failed"
    assert (ended.delivery, ended.delivery_attempts) == ("parked", 5)


async def test_given_queued_jobs_then_placement_counts_higher_priorities_and_earlier_jobs(
    records: JobRecords,
) -> None:
    low = [_job("low") for _ in range(3)]
    for job in low:
        await records.create([job])
    high = _job("high")
    assert ((await records.create([high]))[0]).queue_position == 1  # high jumps the low ones
    await records.start([(low[0], 1)], now_ms=5)

    last_low = await records.get(low[2].id)
    assert last_low is not None
    assert (await records.placement(last_low)).queue_position == 3  # low[1], itself, and high


async def test_given_one_call_for_jobs_of_every_priority_then_each_gets_its_own_placement(
    records: JobRecords,
) -> None:
    placements = await records.create([_job("low"), _job("high"), _job("normal"), _job("high")])

    # Each as it was created, in order: what is queued at its priority or higher is ahead.
    assert [p.queue_position for p in placements] == [1, 1, 2, 2]


async def test_given_finished_jobs_then_placement_reports_a_rate_and_an_eta(records: JobRecords) -> None:
    for _ in range(30):
        await records.finish([(_job(), "succeeded", 1, None, None)])
    waiting = _job()

    placement = (await records.create([waiting]))[0]

    # 30 completions just now, in one 10 s bucket (two if they straddled a boundary): the
    # rate while the model worked, not diluted over the idle rest of the minute.
    assert 1.5 <= placement.completions_per_s <= 3.0
    assert placement.eta_s is not None and 0.3 <= placement.eta_s <= 0.7


async def test_given_an_idempotency_key_then_reserve_tells_new_in_flight_mismatch_and_replay(
    records: JobRecords,
) -> None:
    assert (await records.reserve_key("o", "k", "fp1", "job-1")).outcome == "new"
    assert (await records.reserve_key("o", "k", "fp1", "job-2")).outcome == "in_flight"
    assert (await records.reserve_key("o", "k", "fp2", "job-3")).outcome == "mismatch"
    assert await records.complete_key("o", "k", "job-1", 202)

    replay = await records.reserve_key("o", "k", "fp1", "job-4")

    assert (replay.outcome, replay.job_id, replay.status_code) == ("replay", "job-1", 202)
    assert (await records.reserve_key("other-owner", "k", "fp1", "job-5")).outcome == "new"


async def test_given_a_reservation_that_outlived_its_lease_then_it_cannot_end_the_next_one(
    redis_url: str,
) -> None:
    """Budgets issue, review item 9: complete and release did not check they still owned
    the reservation; a request stalled past its lease ended the next request's, so two jobs
    were accepted under one key (or the key was freed under a job that was queued)."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    records = JobRecords(redis_url, prefix, ttl_s=60)
    store = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert (await records.reserve_key("o", "k", "fp", "stalled")).outcome == "new"
        async for lapsed in store.scan_iter(match=f"{prefix}*"):
            await store.delete(lapsed)  # the stalled request's lease ran out
        assert (await records.reserve_key("o", "k", "fp", "next")).outcome == "new"

        assert not await records.release_key("o", "k", "stalled")
        assert not await records.complete_key("o", "k", "stalled", 202)
        assert (await records.reserve_key("o", "k", "fp", "third")).outcome == "in_flight"  # next's
        assert await records.complete_key("o", "k", "next", 202)
        replay = await records.reserve_key("o", "k", "fp", "fourth")
        assert (replay.outcome, replay.job_id) == ("replay", "next")
    finally:
        await records.close()
        async for key in store.scan_iter(match=f"{prefix}*"):
            await store.delete(key)
        await store.aclose()


async def test_given_a_finish_then_subscribers_hear_the_job_id(records: JobRecords) -> None:
    job = _job()

    subscribed = asyncio.Event()

    async def first_heard() -> str:
        async for job_id in records.finished_jobs(subscribed):
            if job_id is not None:
                return job_id
        raise AssertionError("the subscription ended")

    listening = asyncio.create_task(first_heard())
    await asyncio.wait_for(subscribed.wait(), 5)
    await records.finish([(job, "succeeded", 1, None, None)])

    assert await asyncio.wait_for(listening, 5) == job.id


async def test_given_no_redis_then_unavailable_at_once_and_skipped_for_a_while() -> None:
    records = JobRecords("redis://127.0.0.1:1/0", "t.", ttl_s=60, timeout_s=0.5)
    try:
        with pytest.raises(RecordsUnavailable) as first:
            await records.start([(_job(), 1)], now_ms=1)
        with pytest.raises(RecordsUnavailable) as second:
            await records.finish([(_job(), "succeeded", 1, None, None)])
    finally:
        await records.close()

    assert not first.value.skipped
    assert second.value.skipped  # no second connect timeout within RECORDS_RETRY_S
