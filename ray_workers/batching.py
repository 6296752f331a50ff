"""Pull-side batch forming: wait for the first item, then fill until full or the deadline.

Plain asyncio, separate from Ray and from the broker, so it is tested directly. A lone
job at low load waits at most `max_wait_s` beyond its arrival; under backlog a batch
fills immediately from what the broker has prefetched.
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
) -> Batch[T]:
    """At least one item; at most `max_size`; no more than `max_wait_s` after the first."""
    if max_size < 1:
        raise ValueError(f"max_size={max_size} must be at least 1")
    batch = [await source.get()]
    first_at = clock()
    deadline = first_at + max_wait_s
    while len(batch) < max_size:
        # Take what is already buffered without yielding to the loop.
        while len(batch) < max_size and not source.empty():
            batch.append(source.get_nowait())
        remaining_s = deadline - clock()
        if len(batch) >= max_size or remaining_s <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(source.get(), timeout=remaining_s))
        except TimeoutError:
            break
    return Batch(batch, clock() - first_at)
