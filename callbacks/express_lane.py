"""The express lane: at low load a finished job's event reaches the dispatcher through
Redis as its ending is recorded, a broker hop (1.3 ms here) before its durable copy on
the callbacks queue.

The script that records a lone job's ending also pushes its event onto a list while a
dispatcher holds the lane open (job_records.scripts.FINISH, the worker's one round trip
either way). The broker copy still goes, marked (`x-express`), and it is what settles:

    the lane (here)   pops the event, which makes it this dispatcher's; sends it once
                      and writes the job's mark: delivered, returned (not attempted:
                      its host's breaker is open or the host holds its share) or the
                      failure
    the broker copy   takes the event back while it is still on the list (the copy sends
                      it); else reads the mark: delivered -> acked, nothing sent; failed
                      -> retried or parked as its first attempt; returned, or no mark
                      (its lease ran out: the lane died with it) -> sends it; pushed ->
                      asks again until one of those

So an event is sent once, and one the lane loses is sent by its copy once the mark's
lease (CALLBACK_TIMEOUT_S + LEASE_MARGIN_S) is over: at-least-once, as before, never lost.
The lane is open only while the dispatcher is nearly idle (fewer than IDLE_DELIVERIES
messages under way): under a backlog events go by the broker alone, in the worker's
batches, and the list is capped (job_records.store.EXPRESS_LANE_LONGEST).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from callbacks.client import DeliveryResult
from job_records.store import JobRecords, RecordsUnavailable
from wire.envelope import CallbackDelivery, UndecodableMessage, decode_callback_deliveries

logger = logging.getLogger(__name__)

# Past its delivery timeout, how long an event's copy still waits for the lane's outcome.
LEASE_MARGIN_S = 5.0
# The lane stays open this long after each renewal; it is renewed at half of it.
OPEN_FOR_S = 2.0
# A pop waits this long for an event (under the records client's 1 s socket timeout).
POP_WAIT_S = 0.25
# Messages under way at or above which the dispatcher is busy and the lane closed.
IDLE_DELIVERIES = 8
# A copy asks again after this, doubling up to COPY_POLL_MAX_S, while another
# dispatcher's lane sends its event.
COPY_POLL_S = 0.005
COPY_POLL_MAX_S = 0.2
RECORDS_PAUSE_S = 1.0

DELIVERED = "delivered"
RETURNED = "returned"
PUSHED = "pushed"
TAKE = "take"
FAILED = "failed"
SENT_BY_COPY = "by_copy"

# One attempt at an event (None: not attempted, the copy sends it).
Attempt = Callable[[CallbackDelivery], Awaitable[DeliveryResult | None]]


class ExpressLane:
    """Pops the lane's events while the dispatcher is nearly idle, and tells each
    event's broker copy what became of it."""

    def __init__(
        self,
        records: JobRecords,
        attempt: Attempt,
        busy: Callable[[], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        delivered: Callable[[str], None],
        count: Callable[[str], None],
        lease_s: float,
    ) -> None:
        self._records = records
        self._attempt = attempt
        self._busy = busy
        self._spawn = spawn
        self._delivered = delivered
        self._count = count
        self._lease_s = lease_s
        # Job id -> set once this dispatcher's lane wrote the event's mark.
        self._sending: dict[str, asyncio.Event] = {}
        self.is_open = False
        # Events the lane delivered (their copies are acked without sending).
        self.sent = 0

    async def run(self) -> None:
        """Hold the lane open while not busy and hand each popped event to `spawn`; closes
        the lane when busy or cancelled."""
        renew_at = 0.0
        try:
            while True:
                try:
                    if self._busy():
                        if self.is_open:
                            self.is_open = False
                            await self._records.close_express_lane()
                        await asyncio.sleep(POP_WAIT_S)
                        continue
                    if not self.is_open or time.monotonic() >= renew_at:
                        await self._records.open_express_lane(self._lease_s, OPEN_FOR_S)
                        self.is_open, renew_at = True, time.monotonic() + OPEN_FOR_S / 2
                    event = await self._records.pop_express(POP_WAIT_S)
                except RecordsUnavailable as exc:
                    if not exc.skipped:
                        logger.warning("express lane paused: %s", exc)
                    self.is_open = False
                    await asyncio.sleep(RECORDS_PAUSE_S)
                    continue
                if event is not None:
                    self._spawn(self._send(event))
        finally:
            self.is_open = False
            with contextlib.suppress(RecordsUnavailable):
                await asyncio.shield(self._records.close_express_lane())

    async def _send(self, event: bytes) -> None:
        """One attempt at a popped event, and its mark for the broker copy."""
        try:
            [callback] = decode_callback_deliveries(event, None, payloads_as_bytes=True)
        except UndecodableMessage as exc:
            # Its copy decodes no better: it is parked from the callbacks queue.
            logger.warning("express lane: an undecodable event left to its copy: %s", exc)
            return
        job_id = callback.event.data.id
        marked = self._sending[job_id] = asyncio.Event()
        try:
            result = await self._attempt(callback)
            mark = _mark_of(result)
            await self._records.settle_express(job_id, mark)
            self._count(mark if mark in (DELIVERED, RETURNED) else FAILED)
            if result is not None and result.delivered:
                self.sent += 1
                self._delivered(job_id)
        except RecordsUnavailable as exc:
            # Its copy waits out the lease and sends it again: a duplicate, never a loss.
            logger.warning("express lane: job %s's outcome not marked: %s", job_id, exc)
        finally:
            marked.set()
            del self._sending[job_id]

    async def verdict(self, job_id: str, event: bytes) -> DeliveryResult | None:
        """What the lane made of the job's event, for its broker copy: None when the copy
        sends it (the lane never had it, did not attempt it, or lost it), else the lane's
        attempt's result. Redis away: None (the copy sends it: at-least-once)."""
        pause_s = COPY_POLL_S
        while True:
            try:
                mark = await self._records.take_express(job_id, event)
            except RecordsUnavailable as exc:
                logger.warning("express lane: job %s's copy sent without asking the lane: %s", job_id, exc)
                return None
            if mark == TAKE:
                self._count(SENT_BY_COPY)
                return None
            if mark == RETURNED:
                return None
            if mark == DELIVERED:
                return DeliveryResult(delivered=True)
            if mark != PUSHED:
                return msgspec.json.decode(mark, type=DeliveryResult)
            sending = self._sending.get(job_id)
            if sending is not None:
                await sending.wait()  # bounded: the attempt has the callback timeout
            else:
                await asyncio.sleep(pause_s)  # another dispatcher's lane has it
                pause_s = min(2 * pause_s, COPY_POLL_MAX_S)


def _mark_of(result: DeliveryResult | None) -> str:
    if result is None:
        return RETURNED
    if result.delivered:
        return DELIVERED
    return msgspec.json.encode(result).decode()
