"""Single jobs published as one chunk when many of one queue are on their way at once.

A backlog sent one job per request (64 requests in flight) keeps nearly every request
waiting on its publish's confirm: 62 of 64 at each publish, measured. Each job then
costs the broker a message (its store, confirm, delivery and ack) and the ingress a
publish: most of what a single job costs beside a Celery task. So, while CHUNK_JOBS or
more single jobs of one queue are being published, the next ones of that queue wait to
go together, and the CHUNK_JOBS-th sends them as one chunk message (`wire.job_chunk`):
counted as CHUNK_JOBS jobs, like a batch's chunk, and split by the worker into one
delivery per job, each then running, retrying, parking and calling back as if alone.

A group that is not full after GROUP_HOLD_S goes out job by job, as it would have
without grouping. While a backlog keeps more than CHUNK_JOBS requests in flight, groups
fill well within it (in a few ms at a thousand jobs a second: 1 in 50 groups released
at 50 ms, measured, against 1 in 2 at 20 ms). Below CHUNK_JOBS publishes at once (a job
every few milliseconds, say) a job is published at once: nothing waits. Each request is
answered as alone: its job queued once the chunk is confirmed, or the chunk's failure
(PublishRejected, PublishUncertain, BrokerUnavailable) as its own.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from broker.client import Broker
from wire.job_chunk import CHUNK_JOBS, CHUNK_MAX_BYTES, chunk_message
from wire.outgoing import OutgoingMessage

# The longest a job waits for its group to fill before it is published alone.
GROUP_HOLD_S = 0.05
# A job this large is published alone: a chunk's jobs weigh CHUNK_MAX_BYTES at most.
GROUPED_MAX_BYTES = CHUNK_MAX_BYTES // CHUNK_JOBS

# How a job went: alone at once, in a chunk, or alone after its group did not fill.
HowSent = Literal["alone", "in-a-chunk", "alone-after-hold"]


@dataclass
class _Group:
    """Jobs of one queue waiting to go together; each future says how its job went:
    True (in the chunk, confirmed), False (to be published alone) or the chunk's error."""

    routing_key: str
    chunk_routing_key: str
    members: list[tuple[OutgoingMessage, asyncio.Future[bool]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class SingleJobPublisher:
    """Publishes single jobs to the jobs exchange, grouping them under load (see above)."""

    def __init__(
        self,
        broker: Broker,
        exchange: str,
        timeout_s: float,
        hold_s: float = GROUP_HOLD_S,
        group_past: int = CHUNK_JOBS,
    ) -> None:
        """Jobs of a queue group while more than `group_past` of its jobs are being published."""
        self._broker = broker
        self._group_past = group_past
        self._exchange = exchange
        self._timeout_s = timeout_s
        self._hold_s = hold_s
        # By routing key: jobs being published (held in a group or awaiting a confirm).
        self._publishing: Counter[str] = Counter()
        self._open: dict[str, _Group] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def publish(self, message: OutgoingMessage, routing_key: str, chunk_routing_key: str) -> HowSent:
        """Return, saying how, once the job is confirmed by the broker, alone or in a chunk."""
        groupable = len(message.body) <= GROUPED_MAX_BYTES
        self._publishing[routing_key] += 1
        try:
            grouping = groupable and (
                routing_key in self._open or self._publishing[routing_key] > self._group_past
            )
            if grouping and await self._grouped(message, routing_key, chunk_routing_key):
                return "in-a-chunk"
            await self._publish(message, routing_key)
            return "alone-after-hold" if grouping else "alone"
        finally:
            self._publishing[routing_key] -= 1
            if not self._publishing[routing_key]:
                del self._publishing[routing_key]

    async def close(self) -> None:
        """Release every open group (its jobs go alone) and wait for the chunks being sent."""
        for group in list(self._open.values()):
            self._release(group)
        await asyncio.gather(*self._sending, return_exceptions=True)

    async def _grouped(self, message: OutgoingMessage, routing_key: str, chunk_routing_key: str) -> bool:
        """Whether the job went in a chunk (False: publish it alone); the chunk's error as its own."""
        group = self._open.get(routing_key)
        if group is None:
            group = _Group(routing_key, chunk_routing_key)
            group.timer = asyncio.get_running_loop().call_later(self._hold_s, self._release, group)
            self._open[routing_key] = group
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        group.members.append((message, future))
        if len(group.members) == CHUNK_JOBS:
            self._send(group)
        try:
            return await future
        except asyncio.CancelledError:
            if self._open.get(routing_key) is group:  # not sent yet: the job leaves the group
                group.members = [(m, f) for m, f in group.members if f is not future]
            raise

    def _send(self, group: _Group) -> None:
        self._close(group)
        task = asyncio.create_task(self._send_chunk(group))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send_chunk(self, group: _Group) -> None:
        messages = [message for message, _ in group.members]
        outcome: BaseException | None = None
        try:
            await self._publish(chunk_message(messages), group.chunk_routing_key)
        except Exception as exc:  # every member is told, whatever went wrong
            outcome = exc
        for _, future in group.members:
            if future.done():
                continue
            if outcome is None:
                future.set_result(True)
            else:
                future.set_exception(outcome)

    def _release(self, group: _Group) -> None:
        """The group's jobs go alone."""
        if self._open.get(group.routing_key) is not group:
            return
        self._close(group)
        for _, future in group.members:
            if not future.done():
                future.set_result(False)

    def _close(self, group: _Group) -> None:
        del self._open[group.routing_key]
        if group.timer is not None:
            group.timer.cancel()

    async def _publish(self, message: OutgoingMessage, routing_key: str) -> None:
        await self._broker.publish(message, routing_key, exchange=self._exchange, timeout_s=self._timeout_s)
