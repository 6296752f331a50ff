"""Creating job records for concurrent submissions in one Redis call.

A redis-py call costs the ingress more CPU than the Redis work it asks for (most of it
encoding the command), so the creations requested in one turn of the event loop go out
as one script call: at 64 requests in flight, one call serves a dozen or more. Each
request still waits for its own record, and each is told its own placement or error:
any failure of the call reaches each of them as RecordsUnavailable (their jobs are then
accepted without a record for now, as when Redis is away), never a request left waiting.
"""

from __future__ import annotations

import asyncio

from job_records.store import JobRecords, Placement, RecordsUnavailable
from wire.envelope import Job


class RecordCreation:
    def __init__(self, records: JobRecords) -> None:
        self._records = records
        self._waiting: list[tuple[Job, asyncio.Future[Placement]]] = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def create(self, job: Job) -> Placement:
        """The job's record, created with the others of this turn; RecordsUnavailable as the call's."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Placement] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush_waiting)
        self._waiting.append((job, future))
        return await future

    def _flush_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[Job, asyncio.Future[Placement]]]) -> None:
        try:
            placements = await self._records.create([job for job, _ in batch])
        except Exception as exc:  # every waiting request gets an answer, whatever went wrong
            skipped = isinstance(exc, RecordsUnavailable) and exc.skipped
            for _, future in batch:
                if not future.done():
                    future.set_exception(RecordsUnavailable(f"records not created: {exc!r}", skipped))
            return
        for (_, future), placement in zip(batch, placements, strict=True):
            if not future.done():
                future.set_result(placement)
