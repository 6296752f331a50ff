"""The ingress's admission limit, with a fake clock and a scripted queue depth."""

from __future__ import annotations

import asyncio

import pytest

from ingress.admission import Admission, QueueFull


class _Broker:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.reads = 0

    async def read_depth(self, model: str) -> int:
        self.reads += 1
        await asyncio.sleep(0)
        return self.depth


async def test_given_jobs_between_reads_then_each_counts_and_the_limit_holds() -> None:
    broker, now = _Broker(depth=7), [0.0]
    admission = Admission(broker.read_depth, max_length=10, refresh_s=1.0, clock=lambda: now[0])

    for _ in range(3):
        await admission.admit("echo")
    with pytest.raises(QueueFull, match=r"holds about 10 jobs \(MAX_QUEUE_LENGTH=10\)"):
        await admission.admit("echo")
    assert broker.reads == 1


async def test_given_a_stale_depth_then_it_is_read_again_and_workers_draining_it_frees_room() -> None:
    broker, now = _Broker(depth=10), [0.0]
    admission = Admission(broker.read_depth, max_length=10, refresh_s=1.0, clock=lambda: now[0])
    with pytest.raises(QueueFull):
        await admission.admit("echo")

    broker.depth, now[0] = 4, 1.5
    await admission.admit("echo")

    assert broker.reads == 2


async def test_given_concurrent_requests_then_one_read_serves_them_all() -> None:
    broker = _Broker(depth=0)
    admission = Admission(broker.read_depth, max_length=100, refresh_s=10.0, clock=lambda: 0.0)

    await asyncio.gather(*(admission.admit("echo") for _ in range(20)))

    assert broker.reads == 1


async def test_given_a_refund_then_the_job_no_longer_counts() -> None:
    broker = _Broker(depth=0)
    admission = Admission(broker.read_depth, max_length=1, refresh_s=10.0, clock=lambda: 0.0)
    await admission.admit("echo")
    admission.refund("echo")

    await admission.admit("echo")  # room again
    with pytest.raises(QueueFull):
        await admission.admit("echo")


async def test_given_a_stale_depth_with_room_then_the_job_is_admitted_at_once_and_the_read_follows() -> None:
    broker, now = _Broker(depth=2), [0.0]
    admission = Admission(broker.read_depth, max_length=10, refresh_s=1.0, clock=lambda: now[0])
    await admission.admit("echo")
    release = asyncio.Event()
    slow_reads: list[int] = []

    async def slow_read(model: str) -> int:
        slow_reads.append(1)
        await release.wait()
        return 9

    admission._read_depth = slow_read  # the broker now answers slowly
    now[0] = 1.5
    await asyncio.wait_for(admission.admit("echo"), timeout=1)  # admitted without waiting for the read
    await asyncio.sleep(0)  # the read starts
    await asyncio.wait_for(admission.admit("echo"), timeout=1)  # admitted during the read
    release.set()
    await asyncio.sleep(0.01)
    # 9 read (taken to include the jobs admitted before it) + 1 admitted during it = 10: full.
    with pytest.raises(QueueFull, match=r"holds about 10 jobs"):
        await admission.admit("echo")
    await admission.close()

    assert slow_reads == [1]
