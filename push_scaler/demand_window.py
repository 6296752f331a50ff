"""Which models have demand now: active for `active_for_s` after their last demand event.

Pure (an injectable clock): the gRPC service asks it, the tests drive it with a fake
clock. The window only has to bridge the moment between the first job and the polled
queue length catching up (the management API refreshes every 5 s, KEDA polls on its
interval); from then on the rabbitmq trigger keeps the model awake while work waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DemandWindow:
    def __init__(self, active_for_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if active_for_s <= 0:
            raise ValueError(f"active_for_s must be > 0, got {active_for_s}")
        self._active_for_s = active_for_s
        self._clock = clock
        self._last_demand_s: dict[str, float] = {}

    def record(self, model: str) -> bool:
        """Note demand for `model`; returns whether it was inactive until now."""
        was_active = self.is_active(model)
        self._last_demand_s[model] = self._clock()
        return not was_active

    def is_active(self, model: str) -> bool:
        last = self._last_demand_s.get(model)
        return last is not None and self._clock() - last < self._active_for_s

    def remaining_s(self, model: str) -> float:
        """Seconds until `model` goes inactive without new demand (0 when inactive)."""
        last = self._last_demand_s.get(model)
        return 0.0 if last is None else max(0.0, last + self._active_for_s - self._clock())
