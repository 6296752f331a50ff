"""`Prefer: wait`: requests waiting for their job to end, woken by one shared subscriber.

One task per ingress process subscribes to the records' finished channel and resolves
the futures of the jobs someone waits on, so a waiting request costs a dict entry, not
a polling loop. The subscription exists only while someone waits (and LINGER_S after):
every job's end is published there, and an ingress nobody waits on should not read
them all. A request registers, and the subscription is in place, before it publishes,
so no ending is missed; if the subscription drops (Redis restarts) it is renewed, and a
waiter whose wake-up was lost still reads the record when its wait ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from job_records.store import JobRecords, RecordsUnavailable

logger = logging.getLogger(__name__)

RESUBSCRIBE_INTERVAL_S = 1.0
SUBSCRIBE_TIMEOUT_S = 1.0
LINGER_S = 10.0


class FinishedWaiters:
    def __init__(self, records: JobRecords, max_waiters: int = 1024) -> None:
        self._records = records
        self._max_waiters = max_waiters
        self._count = 0
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._listening: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._last_wait_s = 0.0

    @property
    def full(self) -> bool:
        """MAX_WAITERS requests wait already: the next one is not made to wait."""
        return self._count >= self._max_waiters

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Future[None]]:
        """A future resolved when the job ends, for as long as the block runs."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.setdefault(job_id, []).append(future)
        self._count += 1
        try:
            if self._listening is None:
                self._subscribed = asyncio.Event()
                self._listening = asyncio.create_task(self._listen(self._subscribed), name="finished-jobs")
            with contextlib.suppress(TimeoutError):  # not subscribed in time: the final read covers it
                await asyncio.wait_for(self._subscribed.wait(), SUBSCRIBE_TIMEOUT_S)
            yield future
        finally:
            self._count -= 1
            self._last_wait_s = loop.time()
            futures = self._waiting.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(job_id, None)

    def _idle(self) -> bool:
        return not self._waiting and asyncio.get_running_loop().time() - self._last_wait_s > LINGER_S

    async def _listen(self, subscribed: asyncio.Event) -> None:
        while True:
            try:
                async for job_id in self._records.finished_jobs(subscribed):
                    if job_id is None and self._idle():
                        self._listening = None  # at once: a new waiter starts a new subscription
                        return
                    for future in self._waiting.pop(job_id or "", []):
                        if not future.done():
                            future.set_result(None)
            except RecordsUnavailable as exc:
                if not exc.skipped:
                    logger.warning("finished-job subscription lost, renewing: %s", exc)
            await asyncio.sleep(RESUBSCRIBE_INTERVAL_S)

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listening
