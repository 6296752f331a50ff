"""`MAX_QUEUE_LENGTH`, enforced by the ingress on the jobs it admits.

The limit is not a queue argument: a broker-side `x-max-length` also refuses the retries
that dead-letter back into the queue, and those are dropped without a trace. Here only
new submissions are counted. The queue's depth is read from the broker (a passive
declare) at most every `refresh_s` per model, one read at a time, in the background
while jobs fit (a refusal always waits for a fresh read); between reads each admitted
job counts as one more, so a burst cannot overshoot the limit by more than what other
ingress processes admit in one refresh interval. Retries and replays may take the
queue past the limit: that is the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The model's queue holds at least MAX_QUEUE_LENGTH jobs; try again later."""


@dataclass
class _Depth:
    read_at: float = float("-inf")
    depth: int = 0
    admitted_since_read: int = 0


class Admission:
    def __init__(
        self,
        read_depth: Callable[[str], Awaitable[int]],
        max_length: int,
        refresh_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_depth = read_depth
        self._max_length = max_length
        self._refresh_s = refresh_s
        self._clock = clock
        self._depths: dict[str, _Depth] = {}
        self._reading: dict[str, asyncio.Lock] = {}
        self._background: dict[str, asyncio.Task[None]] = {}

    async def admit(self, model: str, jobs: int = 1) -> None:
        """Count `jobs` in (all or none), or raise QueueFull. A stale depth is read again:
        before a refusal, or when there is none yet, the request waits for the read; a job
        that fits is admitted at once and the read goes on in the background, so a
        request does not pay a broker round trip to learn the queue has room."""
        state = self._depths.setdefault(model, _Depth())
        if self._clock() - state.read_at >= self._refresh_s:
            fits = state.depth + state.admitted_since_read + jobs <= self._max_length
            if state.read_at == float("-inf") or not fits:
                await self._refresh(model, state)
            else:
                self._refresh_in_background(model, state)
        held = state.depth + state.admitted_since_read
        if held + jobs > self._max_length:
            more = "" if jobs == 1 else f"; {jobs} more would exceed it"
            raise QueueFull(
                f"the queue for {model} holds about {held} jobs (MAX_QUEUE_LENGTH={self._max_length}){more}"
            )
        state.admitted_since_read += jobs

    def refund(self, model: str, jobs: int = 1) -> None:
        """Admitted jobs were not published after all: they do not count."""
        state = self._depths.get(model)
        if state is not None:
            state.admitted_since_read = max(0, state.admitted_since_read - jobs)

    async def _refresh(self, model: str, state: _Depth) -> None:
        async with self._reading.setdefault(model, asyncio.Lock()):
            if self._clock() - state.read_at < self._refresh_s:
                return  # another request read it meanwhile
            before = state.admitted_since_read
            state.depth = await self._read_depth(model)
            state.read_at = self._clock()
            # Jobs admitted while the read was in flight may not be in it: they still count.
            state.admitted_since_read = max(0, state.admitted_since_read - before)

    def _refresh_in_background(self, model: str, state: _Depth) -> None:
        running = self._background.get(model)
        if running is None or running.done():
            self._background[model] = asyncio.create_task(self._refresh_quietly(model, state))

    async def _refresh_quietly(self, model: str, state: _Depth) -> None:
        try:
            await self._refresh(model, state)
        except Exception as exc:  # the next request reads it again, and waits for it if it must
            logger.warning("queue depth of %s not read: %s", model, exc)

    async def close(self) -> None:
        for task in self._background.values():
            task.cancel()
        for task in self._background.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
