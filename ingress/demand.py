"""Demand announcements: "jobs for this model are arriving", for an autoscaler at zero.

After the ingress accepts a job it publishes `model.{name}.demand` on the events
exchange, at most once per `interval_s` per model and off the 202 path (a background
task, no confirm): at a thousand jobs a second that is four small messages a second. An
autoscaler listening there wakes a model from zero at once instead of at its next
poll; a lost event costs only that poll, which stays the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from broker.client import Broker, BrokerError

logger = logging.getLogger(__name__)

ANNOUNCE_INTERVAL_S = 0.25


class DemandAnnouncer:
    def __init__(
        self,
        broker: Broker,
        interval_s: float = ANNOUNCE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broker = broker
        self._interval_s = interval_s
        self._clock = clock
        self._last_s: dict[str, float] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def announce(self, model: str) -> None:
        """Note one accepted job; publishes only when the model's last event is old enough."""
        now_s = self._clock()
        if now_s - self._last_s.get(model, float("-inf")) < self._interval_s:
            return
        self._last_s[model] = now_s
        task = asyncio.create_task(self._send(model))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, model: str) -> None:
        try:
            await self._broker.announce(self._broker.topology.demand_key(model), model.encode())
        except BrokerError as exc:
            logger.debug("demand event for %s not sent (polling will see the queue): %s", model, exc)

    async def close(self) -> None:
        for task in list(self._sending):
            with contextlib.suppress(asyncio.CancelledError):
                await task
