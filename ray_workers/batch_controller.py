"""Adaptive batch sizing: an AIMD controller in the spirit of Clipper's.

After each batch it looks at how long the batch took and whether work is waiting:

    batch over the latency target            -> size *= backoff (multiplicative decrease)
    under the headroom (90 % of the target),
      full, and work waiting                 -> size += step     (additive increase)
    otherwise                                -> hold

The headroom keeps the steady state below the target, not astride it, so the
target holds for most batches (p95), not just the average one.

Like TCP, it starts in slow start: until the target is first missed, growth doubles
the size instead of adding `step`, so a replica reaches a useful size in a handful of
batches rather than dozens. The backoff is Clipper's 10 %.

and it sets how long the next batch may wait to fill: with no work waiting (low load)
a lone job is dispatched at once, never held for company; with work waiting the
batch fills from what is already prefetched, and `max_wait_s` only bounds the wait
for stragglers. Pure and clock-free: the worker feeds it measured latencies.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Adjustment(enum.Enum):
    GROW = "grow"
    BACKOFF = "backoff"
    HOLD = "hold"


@dataclass
class AdaptiveBatchController:
    latency_target_s: float
    max_size: int
    min_size: int = 1
    size: int = 1
    step: int = 4
    backoff: float = 0.9
    slow_start: bool = True
    # Grow only while a batch takes less than this fraction of the target.
    headroom: float = 0.9
    max_wait_s: float = 0.005
    wait_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(
                f"batch sizes need 1 <= min_size ({self.min_size}) <= max_size ({self.max_size})"
            )
        if self.latency_target_s <= 0:
            raise ValueError(f"latency_target_s={self.latency_target_s} must be > 0")
        if not 0 < self.backoff < 1:
            raise ValueError(f"backoff={self.backoff} must be in (0, 1)")
        self.size = min(max(self.size, self.min_size), self.max_size)

    def record(
        self, batch_size: int, latency_s: float, work_waiting: bool, failed: bool = False
    ) -> Adjustment:
        """Feed one finished batch; returns what the controller did about the size.

        A failed batch says nothing about how long a good one takes (an out-of-memory error
        comes back at once): it may shrink the size, never grow it."""
        self.wait_s = self.max_wait_s if work_waiting else 0.0
        if failed:
            return Adjustment.HOLD
        if latency_s > self.latency_target_s:
            if self.size <= self.min_size:
                return Adjustment.HOLD
            self.size = max(self.min_size, math.floor(min(self.size, batch_size) * self.backoff))
            self.slow_start = False
            return Adjustment.BACKOFF
        under_headroom = latency_s <= self.latency_target_s * self.headroom
        if under_headroom and work_waiting and batch_size >= self.size and self.size < self.max_size:
            grown = self.size * 2 if self.slow_start else self.size + self.step
            self.size = min(self.max_size, grown)
            return Adjustment.GROW
        return Adjustment.HOLD


class FixedBatchSize(AdaptiveBatchController):
    """The same interface with the size pinned, for baselines (`BATCH_ADAPTIVE=0`): every
    batch, the first included, waits up to `max_wait_s` to fill."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.wait_s = self.max_wait_s

    def record(
        self, batch_size: int, latency_s: float, work_waiting: bool, failed: bool = False
    ) -> Adjustment:
        self.wait_s = self.max_wait_s
        return Adjustment.HOLD
