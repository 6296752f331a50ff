"""What the ingress's handlers share: settings, the broker, the job records and metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request

from broker.client import Broker
from ingress.admission import Admission
from ingress.demand import DemandAnnouncer
from ingress.finished_waiters import FinishedWaiters
from ingress.inflight_bytes import InflightBytes
from ingress.metrics import IngressMetrics
from ingress.pending_records import PendingRecords
from ingress.problems import Problem
from ingress.record_creation import RecordCreation
from ingress.settings import IngressSettings
from ingress.single_job_groups import SingleJobPublisher
from ingress.tenant_lanes import TenantLanes
from job_records.store import JobRecords
from model_catalogue.catalogue import load_catalogue
from model_catalogue.input_schemas import InputSchemas
from object_store.store import ObjectStore
from policies.callback_guard import SystemResolver

# Large bodies decoded at once (in worker threads): about the cores an ingress has.
LARGE_DECODES_AT_ONCE = 2


class IngressState:
    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.broker = Broker(settings.amqp_url, settings.topology, settings.models, role="ingress")
        self.metrics = IngressMetrics()
        self.resolver = SystemResolver(timeout_s=settings.dns_timeout_s)
        self.admission = Admission(self._queue_depth, settings.topology.max_queue_length)
        self.catalogue = load_catalogue(Path(settings.model_catalogue))
        self.input_schemas = InputSchemas(
            self.catalogue, settings.models, settings.input_validation_budget_ms / 1000
        )
        self.inflight = InflightBytes(settings.max_inflight_body_bytes)
        self.large_decodes = asyncio.Semaphore(LARGE_DECODES_AT_ONCE)
        self.demand = DemandAnnouncer(self.broker)
        self.singles = SingleJobPublisher(
            self.broker, settings.topology.jobs_exchange, settings.publish_timeout_s
        )
        self.records = (
            JobRecords(
                settings.redis_url,
                settings.topology.prefix,
                settings.result_ttl_s,
                max_output_bytes=settings.record_output_max_bytes,
            )
            if settings.redis_url
            else None
        )
        store = settings.object_store
        self.uploads = None if store is None else ObjectStore(store)
        self.waiters = None if self.records is None else FinishedWaiters(self.records, settings.max_waiters)
        self.creation = None if self.records is None else RecordCreation(self.records)
        self.pending = None if self.records is None else PendingRecords(self.records)
        self.lanes = TenantLanes(settings.topology, self.records, self._ready_jobs)

    async def _queue_depth(self, model: str) -> int:
        """Ready jobs of the model, in all its queues (every lane and its chunks; on the
        quorum topology every priority's too), read at once."""
        counted = self.settings.topology.counted_queues(model)
        ready = await asyncio.gather(*(self._ready_jobs(queue) for queue, _ in counted))
        return sum(messages * jobs for messages, (_, jobs) in zip(ready, counted, strict=True))

    async def _ready_jobs(self, queue: str) -> int:
        ready, _consumers = await self.broker.queue_depth(queue)
        return ready

    def require_records(self) -> JobRecords:
        """The job records, or 501 when this deployment runs without them (REDIS_URL=off)."""
        if self.records is None:
            raise Problem(
                501,
                "job-records-off",
                "Not Implemented",
                "job records are off here (REDIS_URL=off): no job status, cancel, Idempotency-Key or wait",
            )
        return self.records

    def unavailable(self, slug: str, detail: str) -> Problem:
        retry_after = {"Retry-After": str(self.settings.retry_after_s)}
        return Problem(503, slug, "Service Unavailable", detail, headers=retry_after)

    def records_unavailable(self) -> Problem:
        return self.unavailable("records-unavailable", "the job records are unavailable; retry later")

    async def close(self) -> None:
        await self.admission.close()
        if self.waiters is not None:
            await self.waiters.close()
        if self.pending is not None:
            await self.pending.close()
        if self.records is not None:
            await self.records.close()


def ingress_state(request: Request) -> IngressState:
    state: IngressState = request.app.state.ingress
    return state
