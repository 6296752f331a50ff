"""`Prefer: wait`: requests waiting for their job to end, woken by one shared subscriber.

One task per ingress process subscribes to the records' finished channel and resolves
the futures of the jobs someone waits on, so a waiting request costs a dict entry, not
a polling loop. A request registers before it publishes, so no ending is missed; if
the subscription drops (Redis restarts) it is renewed, and a waiter whose wake-up was
lost still reads the record when its wait ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from contract.job_records import JobRecords, RecordsUnavailable

logger = logging.getLogger(__name__)

RESUBSCRIBE_INTERVAL_S = 1.0


class FinishedWaiters:
    def __init__(self, records: JobRecords) -> None:
        self._records = records
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._listening: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._listening = asyncio.create_task(self._listen(), name="finished-jobs")

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Future[None]]:
        """A future resolved when the job ends, for as long as the block runs."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        try:
            yield future
        finally:
            futures = self._waiting.get(job_id, [])
            if future in futures:
                futures.remove(future)
            if not futures:
                self._waiting.pop(job_id, None)

    async def _listen(self) -> None:
        while True:
            try:
                async for job_id in self._records.finished_jobs():
                    for future in self._waiting.pop(job_id, []):
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
