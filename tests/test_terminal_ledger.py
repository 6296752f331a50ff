"""The terminal ledger against the real Redis: the first terminal event per job wins."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from contract.terminal_ledger import LedgerUnavailable, TerminalLedger


@pytest.fixture
async def ledger(redis_url: str) -> AsyncIterator[TerminalLedger]:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    store = TerminalLedger(redis_url, prefix, ttl_s=60)
    yield store
    await store.close()
    client = redis.asyncio.Redis.from_url(redis_url)
    async with client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)


async def test_given_two_copies_ending_differently_then_the_first_claim_wins_for_both(
    ledger: TerminalLedger,
) -> None:
    first = await ledger.claim({"job-1": "job.succeeded", "job-2": "job.failed"})
    second = await ledger.claim({"job-1": "job.failed", "job-2": "job.failed"})

    assert first == {"job-1": "job.succeeded", "job-2": "job.failed"}
    assert second == {"job-1": "job.succeeded", "job-2": "job.failed"}
    assert await ledger.recorded(["job-1", "job-2", "job-3"]) == {
        "job-1": "job.succeeded",
        "job-2": "job.failed",
    }


async def test_given_racing_claims_then_exactly_one_wins(ledger: TerminalLedger) -> None:
    events = ["job.succeeded", "job.failed", "job.expired"] * 10
    results = await asyncio.gather(*(ledger.claim({"raced": event}) for event in events))

    recorded = {result["raced"] for result in results}
    assert len(recorded) == 1  # every claimant was told the same winner


async def test_given_no_redis_then_unavailable_at_once_and_skipped_for_a_while() -> None:
    ledger = TerminalLedger("redis://127.0.0.1:1/0", "t.", ttl_s=60, timeout_s=0.5)
    try:
        with pytest.raises(LedgerUnavailable) as first:
            await ledger.recorded(["job-1"])
        with pytest.raises(LedgerUnavailable) as second:
            await ledger.claim({"job-1": "job.succeeded"})
    finally:
        await ledger.close()

    assert not first.value.skipped
    assert second.value.skipped  # no second connect timeout within LEDGER_RETRY_S
