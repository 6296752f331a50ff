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


async def test_items_arriving_before_the_deadline_join_the_batch() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()

    async def trickle() -> None:
        for item in range(3):
            await source.put(item)
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(trickle())
    batch = (await collect_batch(source, max_size=8, max_wait_s=2.0)).items
    await producer
    # The first item starts the clock; the others arrive well inside 2 s, but the
    # batch closes only at the deadline or when full: it holds all three.
    assert batch[:1] == [0]
    assert sorted(batch + [source.get_nowait() for _ in range(source.qsize())]) == [0, 1, 2]


async def test_a_zero_wait_takes_only_what_is_buffered() -> None:
    source: asyncio.Queue[int] = asyncio.Queue()
    source.put_nowait(1)
    source.put_nowait(2)
    batch = await collect_batch(source, max_size=8, max_wait_s=0.0)
    assert batch.items == [1, 2] and batch.filled_s < 0.5


async def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_size=0"):
        await collect_batch(asyncio.Queue(), max_size=0, max_wait_s=0.0)
