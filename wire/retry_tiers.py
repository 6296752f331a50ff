"""Retry schedules as data: which delay tier an attempt waits in, and when to give up.

A failed job (or callback) is republished to the delay queue of its tier; the queue's
`x-message-ttl` dead-letters it back to where it came from. One queue per distinct
delay, never per-message TTLs in one shared queue: RabbitMQ expires only the head of
a queue, so a short delay would wait behind a long one. Jitter is applied as a
per-message expiration *below* the tier's TTL, so inside one tier messages differ by
at most the jitter fraction and head-of-line waiting is bounded by it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySchedule:
    """`delays_s[i]` is the wait before attempt i + 2; after the last, give up."""

    delays_s: tuple[float, ...]
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if any(delay <= 0 for delay in self.delays_s):
            raise ValueError(f"retry delays must be > 0 s, got {self.delays_s}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter={self.jitter} must be in [0, 1)")

    @property
    def max_attempts(self) -> int:
        return len(self.delays_s) + 1

    def delay_after(self, attempt: int) -> float | None:
        """The delay before the attempt after `attempt` (1-based), or None: no more tries."""
        if attempt < 1 or attempt > len(self.delays_s):
            return None
        return self.delays_s[attempt - 1]

    def jittered_ms(self, delay_s: float, rand: Callable[[], float] = random.random) -> int:
        """A per-message expiration in (delay * (1 - jitter), delay]."""
        return max(1, round(delay_s * 1000 * (1 - self.jitter * rand())))

    def distinct_delays_s(self) -> tuple[float, ...]:
        return tuple(sorted(set(self.delays_s)))


def tier_name(delay_s: float) -> str:
    """A queue-name suffix that says the delay: 0.2 -> '200ms', 10 -> '10s'."""
    millis = round(delay_s * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"
