"""The callbacks' delivery state, written to the job records in coalesced batches.

A caller reading a job sees whether its callback is pending, delivered or parked, and
after how many attempts. At thousands of callbacks a second one Redis round trip each
would cost the dispatcher a tenth of its CPU, so notes made within FLUSH_INTERVAL_S go
out in one script call (`JobRecords.record_delivery`). Best effort: the callback itself
is what the caller is promised; a state that could not be written is logged and the
record shows the last one that was.
"""

from __future__ import annotations

import asyncio
import logging

from job_records.store import JobRecords, RecordsUnavailable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.02


class DeliveryLog:
    def __init__(self, records: JobRecords | None) -> None:
        self._records = records
        self._notes: list[tuple[str, str, int]] = []
        self._flushing: asyncio.Task[None] | None = None

    def note(self, job_id: str, state: str, attempts: int) -> None:
        """Record (pending | delivered | parked, attempts so far) for the job, soon."""
        if self._records is None:
            return
        self._notes.append((job_id, state, attempts))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(self._records))

    async def _flush(self, records: JobRecords) -> None:
        while self._notes:
            await asyncio.sleep(FLUSH_INTERVAL_S)  # let the notes of the next moments join the batch
            notes, self._notes = self._notes, []
            try:
                await records.record_delivery(notes)
            except RecordsUnavailable as exc:
                if not exc.skipped:
                    logger.warning("delivery state of %d callback(s) not recorded: %s", len(notes), exc)

    async def close(self) -> None:
        if self._flushing is not None:
            await self._flushing
