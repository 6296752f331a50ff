"""Pull-side batch forming: wait for the first item, then fill until full or the deadline.

Plain asyncio, separate from Ray and from the broker, so it is tested directly. A lone
job at low load waits at most `max_wait_s` beyond its arrival; under backlog a batch
fills immediately from what the broker has prefetched. A batch is bounded by bytes too
(`max_bytes`, as `size_of` measures an item): a model decodes and holds a whole batch at
once, and the senders pick each job's size, so 128 jobs of 1 MiB must not make one batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Batch(Generic[T]):
    items: list[T]
    # From the first item's arrival to the batch closing: what batching cost that item.
    filled_s: float


async def collect_batch(
    source: asyncio.Queue[T],
    max_size: int,
    max_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
    max_bytes: int | None = None,
    size_of: Callable[[T], int] = lambda _item: 0,
) -> Batch[T]:
    """At least one item; at most `max_size`, and no more once `max_bytes` are reached; no
    more than `max_wait_s` after the first."""
    if max_size < 1:
        raise ValueError(f"max_size={max_size} must be at least 1")
    batch = [await source.get()]
    held_bytes = size_of(batch[0])
    first_at = clock()
    deadline = first_at + max_wait_s

    def full() -> bool:
        return len(batch) >= max_size or (max_bytes is not None and held_bytes >= max_bytes)

    while not full():
        # Take what is already buffered without yielding to the loop.
        while not full() and not source.empty():
            batch.append(source.get_nowait())
            held_bytes += size_of(batch[-1])
        remaining_s = deadline - clock()
        if full() or remaining_s <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(source.get(), timeout=remaining_s))
        except TimeoutError:
            break
        held_bytes += size_of(batch[-1])
    return Batch(batch, clock() - first_at)
