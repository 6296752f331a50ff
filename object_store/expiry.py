"""Objects expire with their job's record: an upload or an output older than the records'
lifetime (RESULT_TTL_S) is deleted.

A record lives RESULT_TTL_S from its job's end, and an output is written at that end,
so an output outlives its record by no more than one sweep. An upload is kept
RESULT_TTL_S from its PUT: a job still waiting for a worker by then fails with
`the upload is gone`. A sweep lists the two prefixes (S3, Cloud Storage's XML API and
MinIO all list and delete; not every store applies lifecycle rules, moto's does not) and
deletes one object at a time (Cloud Storage's XML API has no multi-object delete). Every
ingress sweeps, at a jittered interval: deletes are idempotent, so replicas that overlap
waste a listing, nothing more. Before its first sweep the sweeper makes the bucket where
the store starts empty (the kind overlay's MinIO), retrying until the store answers: it
may start after the ingress, which serves meanwhile (submissions naming uploads get 503).
"""

from __future__ import annotations

import asyncio
import logging
import random
from datetime import UTC, datetime, timedelta

from object_store.store import ObjectStore, StoreUnavailable

logger = logging.getLogger(__name__)

EXPIRING_PREFIXES = ("uploads/", "outputs/")
BUCKET_RETRY_S = 5.0


async def sweep(store: ObjectStore, ttl_s: float, now: datetime | None = None) -> int:
    """Delete the uploads and outputs last written over `ttl_s` before `now`; how many."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=ttl_s)
    deleted = 0
    for prefix in EXPIRING_PREFIXES:
        async for key, written in store.listed(prefix):  # a page at a time, whatever the bucket holds
            if written < cutoff:
                await store.delete(key)
                deleted += 1
    return deleted


class ExpirySweeper:
    """The bucket made, then `sweep` every `interval_s` (0.5-1.5x, so replicas drift apart)
    until closed."""

    def __init__(self, store: ObjectStore, ttl_s: float, interval_s: float) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._sweeping: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeping = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            await asyncio.gather(self._sweeping, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        await self._bucket_made()
        while True:
            await asyncio.sleep(self._interval_s * random.uniform(0.5, 1.5))
            try:
                deleted = await sweep(self._store, self._ttl_s)
            except StoreUnavailable as exc:
                logger.warning("expired objects are left for the next sweep: %s", exc)
                continue
            if deleted:
                logger.info("deleted %d uploads and outputs older than %.0f s", deleted, self._ttl_s)

    async def _bucket_made(self) -> None:
        while True:
            try:
                await self._store.ensure_bucket()
                return
            except StoreUnavailable as exc:
                logger.warning("the object store's bucket is not confirmed yet: %s", exc)
            await asyncio.sleep(BUCKET_RETRY_S)
