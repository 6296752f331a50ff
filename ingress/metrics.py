"""Prometheus metrics of the ingress, on a registry owned by the app (not global).

Beside its own series, the process's as Prometheus' Python clients export them by
default: `process_*` (CPU seconds, resident memory, open file descriptors),
`python_gc_*` (collections per generation: a full one holds the event loop) and
`python_info`."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (GCCollector, PlatformCollector, ProcessCollector):
            collector(registry=self.registry)
        self.jobs_accepted = Counter(
            "inferq_ingress_jobs_accepted",
            "Jobs confirmed by the broker and answered 202",
            ["model", "priority"],
            registry=self.registry,
        )
        self.jobs_canceled = Counter(
            "inferq_ingress_jobs_canceled",
            "Queued jobs canceled by their callers",
            ["model"],
            registry=self.registry,
        )
        self.requests_rejected = Counter(
            "inferq_ingress_requests_rejected",
            "Job requests answered with an error",
            ["status"],
            registry=self.registry,
        )
        # Per tenant by name (tenants.registry), never by key.
        self.tenant_accepted = Counter(
            "inferq_tenant_jobs_accepted",
            "Jobs accepted, per tenant",
            ["tenant", "model"],
            registry=self.registry,
        )
        self.tenant_refused = Counter(
            "inferq_tenant_requests_refused",
            "Submissions refused by a tenant's limits: rate-limited, quota-exceeded, batch-over-burst, "
            "limits-unavailable",
            ["tenant", "reason"],
            registry=self.registry,
        )
        # ingress.single_job_groups: under a backlog, single jobs go to the broker in chunks.
        self.single_jobs_sent = Counter(
            "inferq_ingress_single_jobs_sent",
            "Single jobs confirmed by the broker, by how they went: alone, in-a-chunk (grouped "
            "under a backlog), alone-after-hold (their group did not fill in time)",
            ["how"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "inferq_ingress_publish_seconds",
            "Publish-to-confirm time",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
