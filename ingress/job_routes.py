"""`GET /v1/jobs/{id}` and `POST /v1/jobs/{id}/cancel`: a job's record, for its owner only.

A job another API key submitted answers 404, like one that never existed or whose
record expired (RESULT_TTL_S): no caller learns which ids exist. Cancel wins only
over a queued job (an atomic compare-and-set against the worker's start); the
`job.canceled` callback is queued here; if that publish fails the ingress hands it to
the worker, which sends it when it meets the canceled job in the queue (and sends it
anyway if it is overdue by CANCEL_HANDOFF_S: an ingress that died in between). A
repeated cancel of a job canceled earlier sends `job.canceled` (same webhook-id) unless
the record says it was queued: the earlier request may have been cut off after Redis
canceled the job and before its callback was queued. A canceled job's upload (`input_ref`)
is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import time

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.client import BrokerError
from ingress.auth import authenticate
from ingress.job_view import job_view
from ingress.problems import Problem
from ingress.state import IngressState, ingress_state
from job_records.store import JobRecord, RecordsUnavailable
from object_store.store import StoreUnavailable
from wire.callback_events import canceled_callback
from wire.envelope import Job

logger = logging.getLogger(__name__)

# After the records failed, a missing record answers 503 record-pending (not 404) this long:
# another replica may hold it in memory until it flushes (every second, once Redis answers).
RECORD_PENDING_GRACE_S = 30.0


async def get_job(request: Request) -> Response:
    state = ingress_state(request)
    record = await _owned_record(state, request)
    try:
        placement = await state.require_records().placement(record) if record.status == "queued" else None
    except RecordsUnavailable:
        placement = None  # the record is what matters; its position is a hint
    return JSONResponse(job_view(record, placement))


async def cancel_job(request: Request) -> Response:
    state = ingress_state(request)
    record = await _owned_record(state, request)
    won, status = False, record.status
    now_ms = int(time.time() * 1000)
    if status == "queued":
        try:
            won, status = await state.require_records().cancel(record, now_ms)
        except RecordsUnavailable as exc:
            raise state.records_unavailable() from exc
    if not won:
        if status == "canceled" and not record.canceled_sent and record.callback_url:
            # Canceled before by a request cut off before its job.canceled was queued (Redis
            # ran the cancel, then the answer was lost: 503): send it now, then say so.
            await _send_canceled(state, record)
        raise Problem(
            409,
            "not-cancelable",
            "Conflict",
            f"job {record.id} is {status}; only a queued job can be canceled",
            extensions={"job_status": status},
        )
    if record.callback_url:
        await _send_canceled(state, record)
    if record.input_ref is not None:
        await _delete_input(state, record.id, record.input_ref)
    state.metrics.jobs_canceled.labels(record.model).inc()
    # The record as the cancel wrote it; reading it back would cost a round trip and,
    # with Redis gone meanwhile, turn a done cancel into a 503.
    return JSONResponse(job_view(msgspec.structs.replace(record, status="canceled", finished_ms=now_ms)))


async def _delete_input(state: IngressState, job_id: str, input_ref: str) -> None:
    """A canceled job's upload is deleted (the expiry sweep deletes it later if the store
    does not answer now)."""
    if state.uploads is None:
        return
    try:
        await state.uploads.delete(input_ref)
    except StoreUnavailable as exc:
        logger.warning("job %s canceled; its upload is left to the expiry sweep: %s", job_id, exc)


async def _send_canceled(state: IngressState, record: JobRecord) -> None:
    job = Job(
        id=record.id,
        model=record.model,
        input=None,
        callback_url=record.callback_url,
        priority=record.priority,  # type: ignore[arg-type]
        metadata=record.metadata,
        submitted_at_ms=record.created_ms or int(time.time() * 1000),
        owner=record.owner,
    )
    publish = canceled_callback(job, time.time(), state.settings.topology)
    try:
        # Through the model's outcomes exchange, as the worker sends it: the ingress's broker
        # user may not write to the default exchange (a refusal would close its channel).
        await state.broker.publish(
            publish.message,
            publish.routing_key,
            exchange=publish.exchange,
            timeout_s=state.settings.publish_timeout_s,
        )
    except BrokerError as exc:
        logger.warning("job %s canceled; its callback is left to the worker: %s", record.id, exc)
        with contextlib.suppress(RecordsUnavailable):  # else the worker's overdue rule sends it
            await state.require_records().hand_cancel_to_worker(record.id)
        return
    with contextlib.suppress(RecordsUnavailable):  # else a repeated cancel sends it again
        await state.require_records().note_canceled_sent(record.id)


async def _owned_record(state: IngressState, request: Request) -> JobRecord:
    owner = authenticate(request, state.settings.tenants).owner
    records = state.require_records()
    job_id = request.path_params["job_id"]
    pending = None if state.pending is None else state.pending.get(job_id)
    if pending is not None and pending.owner == owner:
        raise state.unavailable(
            "record-pending", f"job {job_id} is accepted; its record is written when Redis is back"
        )
    try:
        record = await records.get(job_id)
    except RecordsUnavailable as exc:
        raise state.records_unavailable() from exc
    if record is None and records.failed_within(RECORD_PENDING_GRACE_S):
        # After an outage an accepted job's record may still wait in another replica's
        # memory (ingress.pending_records): not known is not the same as not found.
        raise state.unavailable(
            "record-pending",
            f"no record of job {job_id!r} yet; the job records were unavailable moments ago and "
            "a job accepted meanwhile gets its record shortly",
        )
    if record is None or record.owner != owner:
        raise Problem(
            404, "job-not-found", "Not Found", f"no job {job_id!r} (unknown, expired, or not yours)"
        )
    return record
