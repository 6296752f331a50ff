"""`POST /v1/models/{model}/jobs/batch`: many jobs in one request, all or nothing.

    check every job (cheapest first)       -> 422 naming each bad job by JSON pointer, nothing queued
    reserve the Idempotency-Key (if any)   -> for the whole batch, as for one job
    admit all of them under MAX_QUEUE_LENGTH -> 503 + Retry-After, nothing queued
    create their records                   -> one Redis call
    publish them, pipelined                -> one wait for all the broker's confirms
    202 with every job's id, in request order

Each job is then exactly what a single submission makes: its own message, id, record,
status, cancel, retries, parking and callback. What a batch saves is the per-request
cost: one HTTP exchange, one record call and one confirm wait for all its jobs.

A job's id is derived from the batch's (`batch_job_id`), so a batch sent again under
its Idempotency-Key after an unconfirmed publish goes out with the same job ids, never
as second jobs. When the broker confirms some jobs and not others, the confirmed ones
are accepted and run; the answer is 503 with each job's fate (`queued`, `not-queued`,
`uncertain`), and with a key the whole batch is sent again on retry under the same ids
(copies of a job end once: the records let the first ending win).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.client import BrokerError, BrokerUnavailable, PublishUncertain
from ingress.admission import QueueFull
from ingress.batch_request import decode_batch_request, invalid_batch, job_errors
from ingress.idempotency import accepted_under_key, claim_key, complete_key
from ingress.inflight_bytes import Reservation
from ingress.job_checks import check_callback, check_input_url, checked_job
from ingress.job_view import placement_view
from ingress.problems import Problem
from ingress.request_body import JobRequest
from ingress.request_headers import request_fingerprint
from ingress.state import IngressState
from ingress.submission_route import handle_submission, submission_request
from ingress.tenant_limits import release_queued, reserve_queued
from ingress.uploads import check_uploaded
from job_records.store import Placement, RecordsUnavailable
from tenants.registry import Tenant
from wire.envelope import Job, Priority, decode_job
from wire.job_chunk import CHUNK_JOBS, CHUNK_MAX_BYTES, chunk_message
from wire.job_message import job_message, with_input_bytes
from wire.outgoing import OutgoingMessage

logger = logging.getLogger(__name__)

# A batch's jobs are checked and encoded in a worker thread (LARGE_DECODES_AT_ONCE at a
# time): a thousand small jobs cost the CPU a thousand large ones would. What runs on the
# event loop afterwards goes in waves of this many jobs, each wave one turn of the loop,
# so a batch does not hold it for longer than a wave takes (about 10 ms).
WAVE_JOBS = 64
# Records are created this many to a Redis call (its arguments are encoded on the loop).
RECORDS_PER_CALL = 256
# A batch's schema checks share this many times INPUT_VALIDATION_BUDGET_MS.
BATCH_VALIDATION_BUDGETS = 4


def batch_job_id(batch_id: str, index: int) -> str:
    """The id of a batch's `index`th job: the same whenever the batch is sent under that id."""
    return str(uuid.uuid5(uuid.UUID(batch_id), str(index)))


@dataclass
class BatchSubmission:
    """A checked batch on its way in: its jobs without inputs, their messages (let go
    once the broker has answered for them) and the body's in-flight bytes."""

    batch_id: str
    tenant: Tenant
    jobs: list[Job]
    messages: list[OutgoingMessage] | None
    reservation: Reservation
    key: str | None = None
    fingerprint: str = ""

    @property
    def job_count(self) -> int:
        return len(self.jobs)

    def let_go(self) -> None:
        self.messages = None
        self.reservation.release()

    def relabel(self, batch_id: str) -> None:
        """The batch sent again as `batch_id` (an earlier request's, not fully confirmed)."""
        if self.messages is None:
            raise RuntimeError(f"batch {self.batch_id}: its messages were let go before the relabel")
        jobs, messages = [], []
        for index, (job, message) in enumerate(zip(self.jobs, self.messages, strict=True)):
            job_id = batch_job_id(batch_id, index)
            relabelled = msgspec.structs.replace(decode_job(message.body), id=job_id)
            messages.append(job_message(relabelled, message.headers))
            jobs.append(msgspec.structs.replace(job, id=job_id))
        self.batch_id, self.jobs, self.messages = batch_id, jobs, messages


async def submit_batch(request: Request) -> Response:
    return await handle_submission(request, _batch_submission, accept_batch)


async def _batch_submission(request: Request, state: IngressState) -> BatchSubmission:
    """The request and every job checked before anything is written or queued."""
    settings = state.settings
    start = await submission_request(request, state, settings.max_batch_body_bytes, "MAX_BATCH_BODY_BYTES")
    try:
        batch_id = str(uuid.uuid4())
        async with state.large_decodes:
            checked = await asyncio.to_thread(
                _checked, state, start.model, start.tenant, start.body, batch_id
            )
        await _check_over_the_network(state, checked)
        jobs = [job for _, job, _ in checked.encoded]
        messages = [message for _, _, message in checked.encoded]
    except BaseException:
        start.reservation.release()
        raise
    return BatchSubmission(
        batch_id=batch_id,
        tenant=start.tenant,
        jobs=jobs,
        messages=messages,
        reservation=start.reservation,
        key=start.key,
        fingerprint="" if start.key is None else request_fingerprint(f"{start.model}/batch", start.body),
    )


@dataclass
class _Checked:
    """The batch's jobs encoded, or what is wrong with each bad one."""

    encoded: list[tuple[int, Job, OutgoingMessage]]
    errors: dict[int, list[dict[str, Any]]]
    size: int


def _checked(state: IngressState, model: str, tenant: Tenant, body: bytes, batch_id: str) -> _Checked:
    """Every job checked and encoded (all checks that need no network)."""
    settings = state.settings
    requests: list[JobRequest] = decode_batch_request(body, settings.json_budget, settings.batch_max_jobs)
    deadline = time.monotonic() + BATCH_VALIDATION_BUDGETS * settings.input_validation_budget_ms / 1000
    checked = _Checked([], {}, len(requests))
    for index, job_request in enumerate(requests):
        try:
            job, message = checked_job(
                state, model, tenant, job_request, batch_job_id(batch_id, index), deadline
            )
            checked.encoded.append((index, job, message))
        except Problem as problem:
            checked.errors[index] = job_errors(index, problem)
            if problem.slug == "input-too-complex":
                break  # the batch's budget is spent: the jobs after it are not checked
    return checked


async def _check_over_the_network(state: IngressState, checked: _Checked) -> None:
    """Each distinct callback URL through the guard once (a batch usually names one), and
    each named input (an upload in the store, a URL through the guard); then 422 listing
    every bad job, in order, if there is one."""
    for url in dict.fromkeys(job.callback_url for _, job, _ in checked.encoded):
        try:
            await check_callback(state, url)
        except Problem as problem:
            if problem.status >= 500:
                raise
            for index, job, _ in checked.encoded:
                if job.callback_url == url:
                    checked.errors[index] = job_errors(index, problem)
    await _check_named_inputs(state, checked)
    if checked.errors:
        errors = [error for index in sorted(checked.errors) for error in checked.errors[index]]
        raise invalid_batch(errors, len(checked.errors), checked.size)


async def _check_named_inputs(state: IngressState, checked: _Checked) -> None:
    """Each upload in the store, each URL through the guard (once per batch); each job's
    message then says how large its input is (`wire.job_message.with_input_bytes`)."""
    url_refusals: dict[str, Problem | None] = {}
    for position, (index, job, message) in enumerate(checked.encoded):
        try:
            if job.input_ref is not None:
                size = await check_uploaded(state, job.input_ref)
            elif job.input_url is not None:
                if job.input_url not in url_refusals:
                    url_refusals[job.input_url] = await _problem_of(check_input_url(state, job.input_url))
                if (refusal := url_refusals[job.input_url]) is not None:
                    raise refusal
                size = state.settings.upload_max_bytes
            else:
                continue
        except Problem as problem:
            if problem.status >= 500:
                raise
            checked.errors[index] = job_errors(index, problem)
            continue
        checked.encoded[position] = (index, job, with_input_bytes(message, size))


async def accept_batch(state: IngressState, submission: BatchSubmission) -> Response:
    try:
        if submission.key is None:
            return await _accept(state, submission)
        return await _accept_once(state, submission, submission.key)
    finally:
        submission.let_go()


async def _accept_once(state: IngressState, submission: BatchSubmission, key: str) -> Response:
    """`_accept` under an Idempotency-Key: one batch per (API key, key, body)."""
    owner = submission.jobs[0].owner
    claim = await claim_key(state, owner, key, submission.fingerprint, submission.batch_id, "batch")
    if claim.outcome == "replay":
        return await _replay(state, claim.job_id, len(submission.jobs), claim.status_code or 202)
    if claim.outcome == "uncertain":
        submission.relabel(claim.job_id)
    records = state.require_records()
    ttl_s = max(records.ttl_for(job) for job in submission.jobs)
    accepting = _accept(state, submission)
    response = await accepted_under_key(
        state, owner, key, submission.batch_id, ttl_s, accepting, _PartlyQueued
    )
    await complete_key(state, owner, key, submission.batch_id, 202, ttl_s)
    return response


async def _replay(state: IngressState, batch_id: str, size: int, status_code: int) -> Response:
    job_ids = [batch_job_id(batch_id, index) for index in range(size)]
    try:
        found = await state.require_records().get_many(job_ids)
    except RecordsUnavailable as exc:
        raise state.records_unavailable() from exc
    views = [
        {"id": job_id, "status": "queued" if record is None else record.status}
        for job_id, record in zip(job_ids, found, strict=True)
    ]
    return JSONResponse({"jobs": views}, status_code=status_code, headers={"Idempotent-Replayed": "true"})


class _PartlyQueued(Problem):
    """503: some of the batch's jobs were confirmed (or may be queued), not all."""


async def _accept(state: IngressState, submission: BatchSubmission) -> Response:
    """`_accept_counted` with the jobs counted against the tenant's max_queued: each
    released again unless it was, or may have been, queued."""
    ids = [job.id for job in submission.jobs]
    await reserve_queued(state, submission.tenant, ids)
    try:
        return await _accept_counted(state, submission)
    except _PartlyQueued as partly:
        fates = {view["id"]: view["status"] for view in partly.extensions["jobs"]}
        await release_queued(state, submission.tenant, [i for i in ids if fates.get(i) == "not-queued"])
        raise
    except Exception:
        await release_queued(state, submission.tenant, ids)
        raise


async def _accept_counted(state: IngressState, submission: BatchSubmission) -> Response:
    jobs = submission.jobs
    model = jobs[0].model
    try:
        await state.admission.admit(model, len(jobs))
    except QueueFull as exc:
        raise state.unavailable("queue-full", f"{exc}; nothing was queued, retry later") from exc
    except BrokerUnavailable as exc:
        raise state.unavailable("broker-unavailable", "the job queue is unavailable; retry later") from exc
    # Unkeyed, the records are created while the jobs are published, as for one job.
    creating = asyncio.ensure_future(_create_records(state, jobs, required=submission.key is not None))
    if submission.key is not None:
        try:
            await creating
        except BaseException:
            state.admission.refund(model, len(jobs))
            raise
    fates = await _publish(state, submission)
    placements = await creating
    confirmed = [job for job, fate in zip(jobs, fates, strict=True) if fate == "queued"]
    # As for one job: a job not queued loses its record; one that may be queued keeps it
    # when the key will send it again under its id.
    undone = [
        job
        for job, fate in zip(jobs, fates, strict=True)
        if fate == "not-queued" or (fate == "uncertain" and submission.key is None)
    ]
    if undone and placements is not None:
        with contextlib.suppress(RecordsUnavailable):
            await state.require_records().discard(*undone)
    if placements is None and state.pending is not None:
        for job in confirmed:
            state.pending.add(job)
    for job in confirmed:
        state.metrics.jobs_accepted.labels(job.model, job.priority).inc()
    state.metrics.tenant_accepted.labels(submission.tenant.name, model).inc(len(confirmed))
    if confirmed and state.settings.demand_events:
        state.demand.announce(model)
    if len(confirmed) < len(jobs):
        raise _refusal(state, submission, fates)
    views = [_accepted_view(job, placements[index] if placements else None) for index, job in enumerate(jobs)]
    return JSONResponse({"jobs": views}, status_code=202)


def _accepted_view(job: Job, placement: Placement | None) -> dict[str, Any]:
    view: dict[str, Any] = {"id": job.id, "status": "queued", "priority": job.priority}
    if placement is not None:
        view.update(placement_view(placement))
    return view


def _refusal(state: IngressState, submission: BatchSubmission, fates: list[str]) -> Problem:
    """503 for a batch not wholly queued: nothing queued, or each job's fate."""
    if all(fate == "not-queued" for fate in fates):
        return state.unavailable("not-queued", "the broker did not take the batch; nothing was queued")
    counts = {fate: fates.count(fate) for fate in ("queued", "uncertain", "not-queued")}
    retry = (
        "retry with the same Idempotency-Key: the batch is sent again under the same job ids"
        if submission.key is not None
        else "send again only the jobs not queued"
    )
    return _PartlyQueued(
        503,
        "batch-partly-queued",
        "Service Unavailable",
        f"of {len(fates)} jobs {counts['queued']} are queued, {counts['uncertain']} may be queued "
        f"(sent, not confirmed) and {counts['not-queued']} are not; {retry}",
        headers={"Retry-After": str(state.settings.retry_after_s)},
        extensions={
            "jobs": [{"id": job.id, "status": fate} for job, fate in zip(submission.jobs, fates, strict=True)]
        },
    )


async def _create_records(state: IngressState, jobs: list[Job], required: bool) -> list[Placement] | None:
    if state.records is None:
        return None
    try:
        calls = [jobs[first : first + RECORDS_PER_CALL] for first in range(0, len(jobs), RECORDS_PER_CALL)]
        return [placement for call in calls for placement in await state.records.create(call)]
    except RecordsUnavailable as exc:
        if required:
            raise state.records_unavailable() from exc
        if not exc.skipped:
            logger.warning("batch of %d accepted without records for now: %s", len(jobs), exc)
        return None


async def _publish(state: IngressState, submission: BatchSubmission) -> list[str]:
    """Publish every admitted job, pipelined, and wait for the confirms; returns each
    job's fate: `queued` (confirmed), `uncertain` (sent, not confirmed) or `not-queued`.
    The messages are let go."""
    jobs, messages = submission.jobs, submission.messages
    if messages is None:
        raise RuntimeError(f"batch {submission.batch_id}: its messages were let go before the publish")
    started = time.monotonic()
    topology, timeout_s = state.settings.topology, state.settings.publish_timeout_s
    model = jobs[0].model
    lane = await state.lanes.lane(model, submission.tenant.name)
    publishing: list[asyncio.Task[None]] = []
    # Each publish's jobs, by index: a chunk's fate is each of its jobs'.
    carried: list[list[int]] = []
    for indices, priority, chunked in _message_groups(jobs, [len(m.body) for m in messages]):
        if carried and len(carried) % WAVE_JOBS == 0:
            await asyncio.sleep(0)  # the wave before this one starts; other requests get a turn
        if chunked:
            message = chunk_message([messages[index] for index in indices])
            key = topology.chunk_routing_key(model, priority, lane)
        else:
            message, key = messages[indices[0]], topology.job_routing_key(model, priority, lane)
        publish = state.broker.publish(message, key, exchange=topology.jobs_exchange, timeout_s=timeout_s)
        publishing.append(asyncio.ensure_future(publish))
        carried.append(indices)
    results = await asyncio.gather(*publishing, return_exceptions=True)
    submission.messages = None
    fates = ["queued"] * len(jobs)
    for indices, result in zip(carried, results, strict=True):
        if result is not None:
            logger.warning(
                "jobs %s of batch %s: %s", [jobs[i].id for i in indices], submission.batch_id, result
            )
        for index in indices:
            fates[index] = _fate(result)
    state.admission.refund(jobs[0].model, len(fates) - fates.count("queued"))
    state.metrics.publish_seconds.observe(time.monotonic() - started)
    return fates


def _message_groups(jobs: list[Job], sizes: list[int]) -> list[tuple[list[int], Priority, bool]]:
    """The batch's messages, as (job indices, priority, chunked): per priority, runs of
    CHUNK_JOBS jobs within CHUNK_MAX_BYTES as chunks (`wire.job_chunk`), every other job
    alone."""
    by_priority: dict[Priority, list[int]] = {}
    for index, job in enumerate(jobs):
        by_priority.setdefault(job.priority, []).append(index)
    groups: list[tuple[list[int], Priority, bool]] = []
    for priority, indices in by_priority.items():
        run: list[int] = []
        run_bytes = 0
        for index in indices:
            if run_bytes + sizes[index] > CHUNK_MAX_BYTES:  # the run cannot become a chunk
                groups += [([alone], priority, False) for alone in run]
                run, run_bytes = [], 0
            run.append(index)
            run_bytes += sizes[index]
            if len(run) == CHUNK_JOBS:
                groups.append((run, priority, True))
                run, run_bytes = [], 0
        groups += [([alone], priority, False) for alone in run]
    return groups


def _fate(result: BaseException | None) -> str:
    if result is None:
        return "queued"
    if isinstance(result, PublishUncertain):
        return "uncertain"
    if isinstance(result, BrokerError):
        return "not-queued"
    raise result  # a defect, not the broker's answer


async def _problem_of(check: Awaitable[None]) -> Problem | None:
    """The Problem a check raises, or None: kept per URL, so a batch checks each URL once."""
    try:
        await check
    except Problem as problem:
        return problem
    return None
