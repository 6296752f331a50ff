"""Pull-side batch forming: first item, then fill until full or the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from ray_workers.batching import collect_batch


async def test_a_backlog_fills_a_batch_at_once_without_waiting() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()
    for item in range(10):
        source.put_nowait(item)
    started = time.monotonic()
    batch = (await collect_batch(source, max_size=4, max_wait_s=5.0)).items
    assert batch == [0, 1, 2, 3]
    assert time.monotonic() - started < 1.0
    assert source.qsize() == 6


async def test_a_lone_item_waits_at_most_the_max_wait() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()
    source.put_nowait(7)
    started = time.monotonic()
    batch = (await collect_batch(source, max_size=8, max_wait_s=0.05)).items
    elapsed_s = time.monotonic() - started
    assert batch == [7]
    assert 0.04 <= elapsed_s < 1.0


async def test_items_arriving_before_the_deadline_join_the_batch_until_it_is_full() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()

    async def trickle() -> None:
        for item in range(5):
            await source.put(item)
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(trickle())
    # The first item starts a 10 s clock; the next two arrive well inside it and fill the
    # batch, which closes then, not at the deadline; the rest wait for the next batch.
    batch = await asyncio.wait_for(collect_batch(source, max_size=3, max_wait_s=10.0), timeout=5.0)
    await producer

    assert batch.items == [0, 1, 2]
    assert [source.get_nowait() for _ in range(source.qsize())] == [3, 4]


async def test_given_the_clock_past_the_deadline_then_the_batch_closes_with_what_is_buffered() -> None:
    """An injected clock: the deadline is decided by it, not by the loop's time."""
    source: asyncio.Queue[int] = asyncio.Queue()
    source.put_nowait(1)
    readings = iter([100.0, 160.0, 160.0])  # first item, deadline check, batch closed

    async def late_arrival() -> None:
        await asyncio.sleep(0.2)
        source.put_nowait(2)

    producer = asyncio.create_task(late_arrival())
    batch = await collect_batch(source, max_size=8, max_wait_s=50.0, clock=lambda: next(readings))
    await producer

    assert batch.items == [1]  # 60 s had passed by that clock: no waiting for item 2
    assert batch.filled_s == 60.0
    assert source.get_nowait() == 2


async def test_a_zero_wait_takes_only_what_is_buffered() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()
    source.put_nowait(1)
    source.put_nowait(2)
    batch = await collect_batch(source, max_size=8, max_wait_s=0.0)
    assert batch.items == [1, 2] and batch.filled_s < 0.5


async def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_size=0"):
        await collect_batch(asyncio.Queue(), max_size=0, max_wait_s=0.0)


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "taken"),
    [
        ([300, 300, 300, 300, 300], 1000, 4),  # the item that reaches the bound is the last
        ([5000, 1, 1], 1000, 1),  # one item over the bound still makes a batch
        ([1, 1, 1], 1000, 3),
        ([400, 400, 400], None, 3),
    ],
)
async def test_a_batch_stops_filling_once_it_holds_max_bytes(
    sizes: list[int], max_bytes: int | None, taken: int
) -> None:
    source: asyncio.Queue[bytes] = asyncio.Queue()
    for size in sizes:
        source.put_nowait(b"x" * size)

    batch = await collect_batch(source, max_size=8, max_wait_s=0.0, max_bytes=max_bytes, size_of=len)

    assert len(batch.items) == taken
    assert source.qsize() == len(sizes) - taken
