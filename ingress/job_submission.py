"""Accepting a job: record it, publish it, and answer 202, or 200 if the caller waits.

    reserve the Idempotency-Key (if any)  -> 422 other body, 409 in flight, replay if done
    create the record (queued)            -> Redis away: kept in `pending_records`
    publish and wait for the confirm      -> anything short of it: 503, record and key undone
    complete the key (202)
    Prefer: wait=N                        -> 200 with the final record if it ends in time

A job is accepted exactly when the broker confirmed it. A keyed submission needs
Redis (its promise is kept there), so it answers 503 + Retry-After without it; an
unkeyed one does not.

The job travels here without its input: the `Submission` holds its encoded message,
which is let go once the broker confirmed it, together with the body's in-flight bytes
(`ingress.inflight_bytes`), so a request waiting for its job's end holds no payload.
Waiters are capped (MAX_WAITERS): past the cap the preference is not applied (RFC 7240
lets a server ignore it) and the caller gets its 202 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import JSONResponse, Response

from broker.client import BrokerError, BrokerUnavailable, PublishRejected, PublishUncertain
from ingress.admission import QueueFull
from ingress.idempotency import accepted_under_key, claim_key, complete_key
from ingress.inflight_bytes import Reservation
from ingress.job_view import job_view, placement_view
from ingress.problems import Problem
from ingress.state import IngressState
from ingress.tenant_limits import release_queued, reserve_queued
from job_records.store import KeyClaim, Placement, RecordsUnavailable
from tenants.registry import Tenant
from wire.envelope import Job, decode_job
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage

logger = logging.getLogger(__name__)


@dataclass
class Submission:
    """A validated job on its way in. `job` has no input: `message` carries it, and is
    let go (with the body's reservation) once the broker has confirmed or refused it."""

    job: Job
    tenant: Tenant
    message: OutgoingMessage | None
    reservation: Reservation
    wait_s: int | None = None
    key: str | None = None
    fingerprint: str = ""

    @property
    def job_count(self) -> int:
        return 1

    def let_go(self) -> None:
        self.message = None
        self.reservation.release()

    def relabel(self, job_id: str) -> None:
        """The job sent again as `job_id` (an earlier request's job whose publish was not
        confirmed): decoded and encoded again, a cost paid only on that rare path."""
        if self.message is None:
            raise RuntimeError(f"job {self.job.id}: its message was let go before it was relabelled")
        job = msgspec.structs.replace(decode_job(self.message.body), id=job_id)
        self.message = job_message(job, self.message.headers)
        self.job = msgspec.structs.replace(self.job, id=job_id)


class UncertainPublish(Problem):
    """503: the job's message was written but not confirmed; it may be queued."""


async def accept(state: IngressState, submission: Submission) -> Response:
    try:
        if submission.key is None:
            return await _accept(state, submission)
        return await _accept_once(state, submission, submission.key)
    finally:
        submission.let_go()


async def _accept_once(state: IngressState, submission: Submission, key: str) -> Response:
    """`_accept` under an Idempotency-Key: one job per (API key, key, body) for RESULT_TTL_S."""
    owner = submission.job.owner
    claim = await claim_key(state, owner, key, submission.fingerprint, submission.job.id, "job")
    if claim.outcome == "replay":
        return await _replay(state, claim)
    if claim.outcome == "uncertain":
        submission.relabel(claim.job_id)
    ttl_s = state.require_records().ttl_for(submission.job)
    accepting = _accept(state, submission)
    return await accepted_under_key(state, owner, key, submission.job.id, ttl_s, accepting, UncertainPublish)


async def _accept(state: IngressState, submission: Submission) -> Response:
    """`_accept_counted` with the job counted against its tenant's max_queued: released
    again unless the job was, or may have been, queued."""
    await reserve_queued(state, submission.tenant, [submission.job.id])
    try:
        return await _accept_counted(state, submission)
    except UncertainPublish:
        raise
    except Exception:
        await release_queued(state, submission.tenant, [submission.job.id])
        raise


async def _accept_counted(state: IngressState, submission: Submission) -> Response:
    job, wait_s, key = submission.job, submission.wait_s, submission.key
    # An unkeyed job's record is created while the job is published (one round trip off
    # the request's path): a worker that starts the job first writes the record itself,
    # and `create` then leaves it as the worker wrote it (job_records.scripts). A keyed
    # job's record must exist first: its key is kept there.
    creating = asyncio.ensure_future(_create_record(state, job, required=key is not None))
    if key is not None:
        await creating
    async with _watching(state, job.id, wait_s) as finished:
        placement = await _published(state, submission, creating)
        if placement is None and state.pending is not None:
            state.pending.add(job)
        state.metrics.jobs_accepted.labels(job.model, job.priority).inc()
        state.metrics.tenant_accepted.labels(submission.tenant.name, job.model).inc()
        if state.settings.demand_events:
            state.demand.announce(job.model)
        if key is not None:
            await complete_key(state, job.owner, key, job.id, 202, _ttl_s(state, job))
        if finished is not None and wait_s is not None:
            final = await _wait(state, job.id, finished, wait_s)
            if final is not None:
                if key is not None:
                    await complete_key(state, job.owner, key, job.id, 200, _ttl_s(state, job))
                return JSONResponse(
                    final, headers={"Preference-Applied": f"wait={wait_s}", **_location(job.id)}
                )
    headers = _location(job.id)
    if finished is not None:
        headers["Preference-Applied"] = f"wait={wait_s}"
    return JSONResponse(_accepted_view(job, placement), status_code=202, headers=headers)


async def _published(
    state: IngressState, submission: Submission, creating: asyncio.Future[Placement | None]
) -> Placement | None:
    """The job published and its placement; on a failure its record is undone (kept when
    a keyed publish is uncertain: the retry sends the job again under its id)."""
    try:
        await _publish(state, submission)
    except Problem as problem:
        uncertain_and_kept = isinstance(problem, UncertainPublish) and submission.key is not None
        if await creating is not None and not uncertain_and_kept:
            with contextlib.suppress(RecordsUnavailable):
                await state.require_records().discard(submission.job)
        raise
    return await creating


async def _create_record(state: IngressState, job: Job, required: bool) -> Placement | None:
    if state.creation is None:
        return None
    try:
        return await state.creation.create(job)
    except RecordsUnavailable as exc:
        if required:
            raise state.records_unavailable() from exc
        if not exc.skipped:
            logger.warning("job %s accepted without its record for now: %s", job.id, exc)
        return None


@contextlib.asynccontextmanager
async def _watching(
    state: IngressState, job_id: str, wait_s: int | None
) -> AsyncIterator[asyncio.Future[None] | None]:
    """A future for the job's end when the caller waits (registered before the publish)."""
    if not wait_s or state.waiters is None or state.waiters.full:
        yield None
        return
    async with state.waiters.watch(job_id) as finished:
        yield finished


async def _wait(
    state: IngressState, job_id: str, finished: asyncio.Future[None], wait_s: int
) -> dict[str, Any] | None:
    """The job's final record if it ends within `wait_s`, else None."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(finished), timeout=wait_s)
    try:
        record = await state.require_records().get(job_id)  # also when a wake-up was lost
    except RecordsUnavailable:
        return None
    return job_view(record) if record is not None and record.terminal else None


async def _replay(state: IngressState, claim: KeyClaim) -> Response:
    try:
        record = await state.require_records().get(claim.job_id)
    except RecordsUnavailable as exc:
        raise state.records_unavailable() from exc
    body: dict[str, Any] = {"id": claim.job_id} if record is None else job_view(record)
    headers = {"Idempotent-Replayed": "true", **_location(claim.job_id)}
    return JSONResponse(body, status_code=claim.status_code or 202, headers=headers)


def _ttl_s(state: IngressState, job: Job) -> int:
    return state.require_records().ttl_for(job)


def _location(job_id: str) -> dict[str, str]:
    return {"Location": f"/v1/jobs/{job_id}"}


def _accepted_view(job: Job, placement: Placement | None) -> dict[str, Any]:
    view: dict[str, Any] = {"id": job.id, "model": job.model, "status": "queued", "priority": job.priority}
    if placement is not None:
        view.update(placement_view(placement))
    return view


async def _publish(state: IngressState, submission: Submission) -> None:
    """Admit the job under MAX_QUEUE_LENGTH, publish it, and wait for the broker's confirm;
    anything short of a confirm is a 503 with Retry-After (nothing was accepted). The
    message is let go either way."""
    job, message = submission.job, submission.message
    if message is None:
        raise RuntimeError(f"job {job.id}: its message was let go before it was published")
    started = time.monotonic()
    try:
        lane = await state.lanes.lane(job.model, submission.tenant.name)
        await state.admission.admit(job.model)
        try:
            topology = state.settings.topology
            how = await state.singles.publish(
                message,
                topology.job_routing_key(job.model, job.priority, lane),
                topology.chunk_routing_key(job.model, job.priority, lane),
            )
        except BrokerError:
            state.admission.refund(job.model)
            raise
        finally:
            submission.let_go()
    except QueueFull as exc:
        raise state.unavailable("queue-full", f"{exc}; retry later") from exc
    except PublishRejected as exc:
        logger.warning("job %s not taken by the broker: %s", job.id, exc)
        raise state.unavailable("not-queued", f"the broker did not take the job: {exc}") from exc
    except PublishUncertain as exc:
        logger.warning("job %s may be queued, its publish was not confirmed: %s", job.id, exc)
        raise UncertainPublish(
            503,
            "publish-uncertain",
            "Service Unavailable",
            f"job {job.id} was sent to the queue but not confirmed, so it may be queued; retry "
            "with the same Idempotency-Key and it is sent again under this id, never as a second job",
            headers={"Retry-After": str(state.settings.retry_after_s)},
            extensions={"job_id": job.id},
        ) from exc
    except BrokerUnavailable as exc:
        logger.warning("job %s not published, broker unavailable: %s", job.id, exc)
        raise state.unavailable("broker-unavailable", "the job queue is unavailable; retry later") from exc
    state.metrics.single_jobs_sent.labels(how).inc()
    state.metrics.publish_seconds.observe(time.monotonic() - started)
