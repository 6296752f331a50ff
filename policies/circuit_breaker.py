"""A circuit breaker as a pure policy: closed -> open -> half-open -> closed.

Closed: everything passes; `failure_threshold` consecutive failures open it. Open:
nothing passes until `cooldown_s` has gone by on the injected clock; then it is
half-open and lets one probe through. The probe's success closes it, its failure
opens it again for another cool-down. The model workers use one per replica (an
open breaker stops consuming), the callback dispatcher one per callback host.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    cooldown_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    # When the last failure was recorded (the clock's time; 0 before any).
    last_failure_at: float = 0.0
    _opened_at: float = field(default=0.0, repr=False)
    _probe_out: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold={self.failure_threshold} must be at least 1")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s={self.cooldown_s} must not be negative")

    def remaining_cooldown_s(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - self.clock())

    def allow(self) -> bool:
        """May one more call go through now? In half-open, only a single probe may."""
        if self.state is BreakerState.OPEN and self.remaining_cooldown_s() <= 0:
            self.state = BreakerState.HALF_OPEN
            self._probe_out = False
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.HALF_OPEN and not self._probe_out:
            self._probe_out = True
            return True
        return False

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._probe_out = False

    def stale(self) -> bool:
        """Closed, and without a failure for a cool-down: it keeps nothing worth keeping."""
        quiet_s = self.clock() - self.last_failure_at
        return self.state is BreakerState.CLOSED and (
            self.consecutive_failures == 0 or quiet_s > self.cooldown_s
        )

    def record_failure(self) -> None:
        self.last_failure_at = self.clock()
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or self.consecutive_failures >= self.failure_threshold:
            self.state = BreakerState.OPEN
            self._opened_at = self.clock()
            self._probe_out = False
