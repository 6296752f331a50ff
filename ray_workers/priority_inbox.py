"""A replica's inbox of prefetched jobs: highest priority first, and within a priority,
tenants in turn, in proportion to their weights.

The broker orders a classic priority queue, but only up to what it has already handed
out: jobs prefetched by a replica wait in the order they came. On the quorum topology
each priority is a queue of its own with its own consumer, and every topology spreads
tenants over lanes (`wire.topology`), each a queue with its own consumer, so a replica
holds jobs of several priorities and tenants at once. The next batch must take a
waiting high-priority job before any lower one, so the inbox orders by the job's AMQP
priority (set from its `priority` on every copy, `wire.job_message`).

Within a level it is stride scheduling over tenants (the job's `x-tenant` header):
each tenant's next job has a pass, the smallest pass goes first (first come first
served between equals), and serving one adds 1/weight (`x-tenant-weight`) to its
tenant's pass. A tenant with nothing waiting is forgotten, and one that arrives joins
at the pass last served, so idling earns no credit: a tenant with a trickle of jobs is
served next, not after another's backlog. An `asyncio.Queue`, so `collect_batch`
fills from it unchanged.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from broker.client import Delivery
from wire.job_message import tenant_of, weight_of


@dataclass
class _TenantTurns:
    waiting: deque[Delivery] = field(default_factory=deque)
    next_pass: float = 0.0


@dataclass
class _Level:
    """One priority's waiting jobs, by tenant."""

    tenants: dict[str, _TenantTurns] = field(default_factory=dict)
    served_pass: float = 0.0

    def put(self, delivery: Delivery) -> None:
        tenant = tenant_of(delivery.headers)
        turns = self.tenants.get(tenant)
        if turns is None:
            turns = self.tenants[tenant] = _TenantTurns(next_pass=self.served_pass)
        turns.waiting.append(delivery)

    def get(self) -> Delivery:
        tenant, turns = min(self.tenants.items(), key=lambda item: item[1].next_pass)
        delivery = turns.waiting.popleft()
        self.served_pass = turns.next_pass
        turns.next_pass += 1.0 / weight_of(delivery.headers)
        if not turns.waiting:
            del self.tenants[tenant]
        return delivery


class _Levels:
    """The inbox's storage: asyncio.Queue reads only its length."""

    def __init__(self) -> None:
        self.by_priority: dict[int, _Level] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Delivery]:
        """What waits, for asyncio.Queue's repr."""
        for level in self.by_priority.values():
            for turns in level.tenants.values():
                yield from turns.waiting


class PriorityInbox(asyncio.Queue[Delivery]):
    # asyncio.Queue's storage hooks, as asyncio.PriorityQueue uses them.
    def _init(self, maxsize: int) -> None:
        self._queue = _Levels()

    def _put(self, item: Delivery) -> None:
        levels = self._queue.by_priority
        level = levels.get(item.priority)
        if level is None:
            level = levels[item.priority] = _Level()
        level.put(item)
        self._queue.size += 1

    def _get(self) -> Delivery:
        levels = self._queue.by_priority
        priority = max(levels)
        level = levels[priority]
        delivery = level.get()
        if not level.tenants:  # a tenant with nothing waiting is forgotten
            del levels[priority]
        self._queue.size -= 1
        return delivery
