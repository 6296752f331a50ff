"""What a worker reports: batches, the controller's decisions, outcomes, the breaker.

The series are declared once, in `SERIES`; `WorkerMetrics` is what the job loop calls,
and it records into a `MetricSink` (`metrics.series`).
"""

from __future__ import annotations

from metrics.series import MetricSink, Series, SeriesTable

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


SERIES: SeriesTable = {
    "batch_size": Series(
        "inferq_worker_batch_size", "Jobs per batch", "histogram", buckets=BATCH_SIZE_BUCKETS
    ),
    "batch_wait": Series(
        "inferq_worker_batch_wait_seconds",
        "Time a batch waited to fill",
        "histogram",
        buckets=SECONDS_BUCKETS,
    ),
    "inference": Series(
        "inferq_worker_inference_seconds", "Model time per batch", "histogram", buckets=SECONDS_BUCKETS
    ),
    "adjustments": Series(
        "inferq_worker_batch_adjustments",
        "Batch-size controller decisions",
        "counter",
        ("model", "adjustment"),
    ),
    "target_size": Series("inferq_worker_batch_target_size", "Batch size the controller aims for", "gauge"),
    "target_wait": Series(
        "inferq_worker_batch_max_wait_seconds", "How long the next batch may wait to fill", "gauge"
    ),
    "outcomes": Series("inferq_worker_jobs", "Settled jobs by outcome", "counter", ("model", "outcome")),
    "tenant_outcomes": Series(
        "inferq_tenant_jobs_completed",
        "Jobs ended per tenant (by name, from the job), by outcome",
        "counter",
        ("tenant", "model", "outcome"),
    ),
    "breaker": Series("inferq_worker_breaker_state", "Model breaker: 0 closed, 1 half-open, 2 open", "gauge"),
}


class WorkerMetrics:
    def __init__(self, sink: MetricSink) -> None:
        self.sink = sink

    def observe_batch(self, model: str, size: int, wait_s: float, inference_s: float) -> None:
        labels = {"model": model}
        self.sink.record("batch_size", size, labels)
        self.sink.record("batch_wait", wait_s, labels)
        self.sink.record("inference", inference_s, labels)

    def record_adjustment(self, model: str, adjustment: str, target_size: int, wait_s: float) -> None:
        self.sink.record("adjustments", 1, {"model": model, "adjustment": adjustment})
        self.sink.record("target_size", target_size, {"model": model})
        self.sink.record("target_wait", wait_s, {"model": model})

    def count_outcome(self, model: str, outcome: str, tenant: str = "") -> None:
        self.sink.record("outcomes", 1, {"model": model, "outcome": outcome})
        self.sink.record(
            "tenant_outcomes", 1, {"tenant": tenant or "anonymous", "model": model, "outcome": outcome}
        )

    def set_breaker_state(self, model: str, state: str) -> None:
        self.sink.record("breaker", BREAKER_STATE_VALUE[state], {"model": model})
