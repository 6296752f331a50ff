"""Which lane of a model a tenant's new jobs go to (`TENANT_LANES`, `wire.topology`).

Fair share needs tenants in different queues: a worker can serve tenants in turn only
among the jobs it holds, and a FIFO holding one tenant's backlog gives it nothing else.
So each tenant's jobs of a model go to one lane, leased in Redis so that every ingress
process agrees: a tenant keeps its lane while it submits, and one without a lease takes
the lane fewest tenants hold, the shallowest of those. Each process keeps the answer
for a quarter of the lease, so the single-tenant path pays no Redis round trip per
job. Without Redis (off, or not answering) a tenant's lane is a hash of its name:
still one lane per tenant, but two tenants may then share one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker.client import BrokerError
from job_records.store import JobRecords, RecordsUnavailable
from wire.topology import Topology

# How long a tenant keeps its lane after its last submission (renewed as it submits).
LANE_LEASE_S = 300.0
# How long a process keeps an answer before it asks (and renews) again.
LANE_KEPT_S = LANE_LEASE_S / 4
# How long a hashed lane (Redis not answering) is kept before Redis is asked again.
HASHED_LANE_KEPT_S = 5.0


def hashed_lane(tenant: str, lanes: int) -> int:
    """A lane from the tenant's name alone, the same in every process."""
    return int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:8], "big") % lanes


@dataclass(frozen=True)
class _Kept:
    lane: int
    until: float


class TenantLanes:
    def __init__(
        self,
        topology: Topology,
        records: JobRecords | None,
        read_depth: Callable[[str], Awaitable[int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topology = topology
        self._records = records
        self._read_depth = read_depth
        self._clock = clock
        self._kept: dict[tuple[str, str], _Kept] = {}

    async def lane(self, model: str, tenant: str) -> int:
        """The lane for `tenant`'s next jobs of `model` (0 where there is one lane)."""
        lanes = self._topology.tenant_lanes
        if lanes == 1:
            return 0
        kept = self._kept.get((model, tenant))
        now = self._clock()
        if kept is not None and now < kept.until:
            return kept.lane
        if self._records is None:
            lane, keep_s = hashed_lane(tenant, lanes), LANE_KEPT_S
        else:
            try:
                depths = await asyncio.gather(*(self._lane_depth(model, lane) for lane in range(lanes)))
                lane = await self._records.lease_lane(model, tenant, LANE_LEASE_S, depths)
                keep_s = LANE_KEPT_S
            except (RecordsUnavailable, BrokerError):
                # Where the tenant had a lane, it keeps it; else its name picks one.
                lane = kept.lane if kept is not None else hashed_lane(tenant, lanes)
                keep_s = HASHED_LANE_KEPT_S
        self._kept[(model, tenant)] = _Kept(lane, now + keep_s)
        return lane

    async def _lane_depth(self, model: str, lane: int) -> int:
        counted = self._topology.lane_counted_queues(model, lane)
        return sum([await self._read_depth(queue) * jobs for queue, jobs in counted])
