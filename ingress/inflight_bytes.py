"""Request bodies in flight, bounded by bytes.

A body is held, decoded (up to about 15x its size within the JSON budget) and encoded
again before its job is confirmed; a count of requests does not bound that, since the
sender picks each body's size. Each submission reserves its body's size (Content-Length,
or MAX_BODY_BYTES when the length is not declared) until its job is confirmed or
refused; past MAX_INFLIGHT_BODY_BYTES it is answered 503 + Retry-After at once. A lone
request always fits, whatever its size within MAX_BODY_BYTES, so the budget never
refuses the only request in flight.
"""

from __future__ import annotations

from dataclasses import dataclass


class InflightFull(Exception):
    """Reserving the body's bytes would exceed MAX_INFLIGHT_BODY_BYTES."""


@dataclass
class InflightBytes:
    max_bytes: int
    used: int = 0

    def reserve(self, size: int) -> Reservation:
        if self.used and self.used + size > self.max_bytes:
            raise InflightFull(
                f"{self.used} bytes of request bodies are in flight; {size} more would exceed "
                f"{self.max_bytes} (MAX_INFLIGHT_BODY_BYTES)"
            )
        self.used += size
        return Reservation(self, size)


@dataclass
class Reservation:
    """Bytes held until `release` (idempotent: a request may release early)."""

    budget: InflightBytes
    size: int

    def release(self) -> None:
        self.budget.used -= self.size
        self.size = 0
