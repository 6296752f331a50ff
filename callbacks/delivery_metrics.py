"""What the callback stage reports: each attempt's outcome and time, deliveries sent back
without an attempt (host breaker open, host over its share), parked callbacks, and what
the express lane made of the events it was handed (callbacks.express_lane).

No host label: callers bring any number of hosts, and a label per host would grow the
series without bound. Per-host trouble shows in the logs and the breaker's decisions.
"""

from __future__ import annotations

from metrics.series import MetricSink, Series, SeriesTable

ATTEMPT_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

CALLBACK_SERIES: SeriesTable = {
    "attempts": Series(
        "inferq_callbacks_attempts",
        "Delivery attempts by outcome: delivered, retry (a retryable failure), refused (permanent)",
        "counter",
        ("outcome",),
    ),
    "attempt_time": Series(
        "inferq_callbacks_attempt_seconds",
        "Time of one delivery attempt, connect to answer",
        "histogram",
        (),
        ATTEMPT_SECONDS_BUCKETS,
    ),
    "deferred": Series(
        "inferq_callbacks_deferred",
        "Deliveries sent back to a delay tier without an attempt, by reason",
        "counter",
        ("reason",),
    ),
    "parked": Series("inferq_callbacks_parked", "Callbacks moved to the parking lot", "counter", ()),
    "express": Series(
        "inferq_callbacks_express",
        "Events handed to the express lane, by what became of them: delivered, failed (its broker copy"
        " retries or parks it), returned (not attempted: the copy sends it), by_copy (the copy sent it:"
        " it came first, or the lane lost the event)",
        "counter",
        ("outcome",),
    ),
}


class DeliveryMetrics:
    def __init__(self, sink: MetricSink) -> None:
        self.sink = sink

    def attempted(self, outcome: str, seconds: float) -> None:
        self.sink.record("attempts", 1, {"outcome": outcome})
        self.sink.record("attempt_time", seconds, {})

    def deferred(self, reason: str) -> None:
        self.sink.record("deferred", 1, {"reason": reason})

    def parked(self) -> None:
        self.sink.record("parked", 1, {})

    def expressed(self, outcome: str) -> None:
        self.sink.record("express", 1, {"outcome": outcome})
