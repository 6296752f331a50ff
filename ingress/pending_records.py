"""Records of jobs accepted while Redis was away, written when it answers again.

The broker is the source of truth: a job without an Idempotency-Key is accepted when
the broker confirms it, Redis or not. Its record is kept here and written by a
background task once Redis answers (the worker writes it too when it starts the job,
whichever comes first). Meanwhile `GET /v1/jobs/{id}` answers 503 for it. Bounded by
bytes, not by count (a job's metadata is the sender's to size; its input is not kept
here): past MAX_PENDING_BYTES the oldest are dropped from memory (their jobs still run
and the worker records them), and a restarted ingress leaves the rest to the worker the
same way. Records are written FLUSH_BATCH at a time, one round trip each, so another
replica stops answering 404 for them soon after Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict

import msgspec

from job_records.store import JobRecords, RecordsUnavailable
from wire.envelope import Job

logger = logging.getLogger(__name__)

MAX_PENDING_BYTES = 32 * 1024 * 1024
FLUSH_INTERVAL_S = 1.0
FLUSH_BATCH = 256


class PendingRecords:
    def __init__(self, records: JobRecords, max_bytes: int = MAX_PENDING_BYTES) -> None:
        self._records = records
        self._max_bytes = max_bytes
        self._bytes = 0
        self._jobs: OrderedDict[str, tuple[Job, int]] = OrderedDict()
        self._flushing: asyncio.Task[None] | None = None

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def get(self, job_id: str) -> Job | None:
        held = self._jobs.get(job_id)
        return None if held is None else held[0]

    def add(self, job: Job) -> None:
        size = len(msgspec.json.encode(job))
        self._jobs[job.id] = (job, size)
        self._bytes += size
        while self._bytes > self._max_bytes and len(self._jobs) > 1:
            dropped, (_, dropped_size) = self._jobs.popitem(last=False)
            self._bytes -= dropped_size
            logger.warning(
                "job %s: record left to the worker (over %d bytes pending)", dropped, self._max_bytes
            )
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name="pending-records")

    async def _flush(self) -> None:
        while self._jobs:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            while self._jobs:
                batch = list(itertools.islice(self._jobs.values(), FLUSH_BATCH))
                try:
                    await self._records.create([job for job, _ in batch])
                except RecordsUnavailable:
                    break  # still away: try again after the interval
                for job, size in batch:
                    if self._jobs.pop(job.id, None) is not None:
                        self._bytes -= size
            if not self._jobs:
                logger.info("records of jobs accepted while Redis was away are written")

    async def close(self) -> None:
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
