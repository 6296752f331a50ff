"""Records of jobs accepted while Redis was away, written when it answers again.

The broker is the source of truth: a job without an Idempotency-Key is accepted when
the broker confirms it, Redis or not. Its record is kept here and written by a
background task once Redis answers (the worker writes it too when it starts the job,
whichever comes first). Meanwhile `GET /v1/jobs/{id}` answers 503 for it. Bounded: past
MAX_PENDING the oldest are dropped from memory (their jobs still run and the worker
records them), and a restarted ingress leaves the rest to the worker the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

from contract.envelope import Job
from contract.job_records import JobRecords, RecordsUnavailable

logger = logging.getLogger(__name__)

MAX_PENDING = 100_000
FLUSH_INTERVAL_S = 1.0


class PendingRecords:
    def __init__(self, records: JobRecords) -> None:
        self._records = records
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._flushing: asyncio.Task[None] | None = None

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > MAX_PENDING:
            dropped, _ = self._jobs.popitem(last=False)
            logger.warning("job %s: record left to the worker (more than %d pending)", dropped, MAX_PENDING)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="pending-records")

    async def _flush(self) -> None:
        while self._jobs:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            while self._jobs:
                job_id, job = next(iter(self._jobs.items()))
                try:
                    await self._records.create([job])
                except RecordsUnavailable:
                    break  # still away: try again after the interval
                self._jobs.pop(job_id, None)
            if not self._jobs:
                logger.info("records of jobs accepted while Redis was away are written")

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
