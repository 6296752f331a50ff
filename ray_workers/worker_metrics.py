"""What a worker reports: batches, the controller's decisions, outcomes, the breaker.

`WorkerMetrics` is the interface the job loop calls; `PrometheusWorkerMetrics` keeps
them in a prometheus_client registry (tests, a worker outside Ray). Inside Ray Serve
replicas `deployment.RayWorkerMetrics` records the same series with Ray's metrics API,
which Ray exports in Prometheus format on the node's metrics port.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class WorkerMetrics(Protocol):
    def observe_batch(self, model: str, size: int, wait_s: float, inference_s: float) -> None: ...

    def record_adjustment(self, model: str, adjustment: str, target_size: int, wait_s: float) -> None: ...

    def count_outcome(self, model: str, outcome: str) -> None: ...

    def set_breaker_state(self, model: str, state: str) -> None: ...


class PrometheusWorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.batch_size = Histogram(
            "inferq_worker_batch_size",
            "Jobs per batch",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_wait = Histogram(
            "inferq_worker_batch_wait_seconds",
            "Time a batch waited to fill",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "inferq_worker_inference_seconds",
            "Model time per batch",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.adjustments = Counter(
            "inferq_worker_batch_adjustments",
            "Batch-size controller decisions",
            ["model", "adjustment"],
            registry=self.registry,
        )
        self.target_size = Gauge(
            "inferq_worker_batch_target_size",
            "Batch size the controller aims for",
            ["model"],
            registry=self.registry,
        )
        self.target_wait = Gauge(
            "inferq_worker_batch_max_wait_seconds",
            "How long the next batch may wait to fill",
            ["model"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "inferq_worker_jobs", "Settled jobs by outcome", ["model", "outcome"], registry=self.registry
        )
        self.breaker = Gauge(
            "inferq_worker_breaker_state",
            "Model breaker: 0 closed, 1 half-open, 2 open",
            ["model"],
            registry=self.registry,
        )

    def observe_batch(self, model: str, size: int, wait_s: float, inference_s: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_wait.labels(model).observe(wait_s)
        self.inference.labels(model).observe(inference_s)

    def record_adjustment(self, model: str, adjustment: str, target_size: int, wait_s: float) -> None:
        self.adjustments.labels(model, adjustment).inc()
        self.target_size.labels(model).set(target_size)
        self.target_wait.labels(model).set(wait_s)

    def count_outcome(self, model: str, outcome: str) -> None:
        self.outcomes.labels(model, outcome).inc()

    def set_breaker_state(self, model: str, state: str) -> None:
        self.breaker.labels(model).set(BREAKER_STATE_VALUE[state])
