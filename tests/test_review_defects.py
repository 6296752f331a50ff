"""Regression tests for the budgets issue's review findings that have no better home
(the item number is in each test's docstring). Real Redis, real broker."""

from __future__ import annotations

import asyncio
import time
import uuid

from contract.envelope import Job
from contract.job_records import JobRecords, RecordsUnavailable
from ingress.record_creation import RecordCreation


def _job(**fields: object) -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input=None,
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
