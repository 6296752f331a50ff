"""A consumer's prefetch bounded by bytes: at most `max_bytes` of the large bodies lately
seen held unsettled, whatever the count allows.

RabbitMQ bounds a prefetch by messages only, and the senders pick each message's size.
The largest body seen is remembered and shrinks by `decay` at each observation that
brings no larger one, so a burst of large messages lowers the prefetch at once and the
bound relaxes as they pass. Pure: the worker (per batch) and the dispatcher (per message)
feed it sizes and apply what it answers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefetchBytes:
    max_bytes: int
    decay: float
    large_body_bytes: int = 0

    def observe(self, body_bytes: int) -> None:
        self.large_body_bytes = max(body_bytes, int(self.large_body_bytes * self.decay))

    def bound(self, by_count: int) -> int:
        """The prefetch: `by_count`, lowered to what `max_bytes` of large bodies allows (>= 1)."""
        if self.large_body_bytes <= 0:
            return by_count
        return max(1, min(by_count, self.max_bytes // self.large_body_bytes))
