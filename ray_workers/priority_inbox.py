"""A replica's inbox of prefetched jobs, served highest priority first.

The broker orders a classic priority queue, but only up to what it has already handed
out: jobs prefetched by a replica wait in the order they came. On the quorum topology
each priority is a queue of its own with its own consumer, so a replica holds jobs of
all three at once. Either way the next batch must take a waiting high-priority job
before any lower one, so the inbox orders by the job's AMQP priority (set from its
`priority` on every copy, `wire.job_message`), first come first served within a
level. An `asyncio.Queue`, so `collect_batch` fills from it unchanged.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

from broker.client import Delivery


class PriorityInbox(asyncio.Queue[Delivery]):
    # asyncio.Queue's storage hooks, as asyncio.PriorityQueue uses them.
    def _init(self, maxsize: int) -> None:
        self._queue: list[tuple[int, int, Delivery]] = []
        self._arrivals = itertools.count()

    def _put(self, item: Delivery) -> None:
        heapq.heappush(self._queue, (-item.priority, next(self._arrivals), item))

    def _get(self) -> Delivery:
        return heapq.heappop(self._queue)[2]
