"""The checks one job request passes before anything is written or queued, and the job
it becomes: shared by a single submission and each job of a batch, so both refuse the
same things with the same problem types."""

from __future__ import annotations

import math
import time
import uuid

import msgspec

from ingress.problems import Problem
from ingress.request_body import JobRequest
from ingress.state import IngressState
from ingress.uploads import check_input_ref
from model_catalogue.input_schemas import ValidationBudgetExceeded
from policies.callback_guard import CallbackUrlRejected, ResolutionUnavailable, check_callback_url
from tenants.registry import Tenant
from wire.envelope import Job
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage


def served_model(state: IngressState, model: str) -> str:
    """`model` when this deployment serves it, else 404."""
    if model not in state.settings.models:
        raise Problem(
            404,
            "unknown-model",
            "Not Found",
            f"model {model!r} is not served; served models: {list(state.settings.models)}",
        )
    return model


def checked_job(
    state: IngressState,
    model: str,
    tenant: Tenant,
    job_request: JobRequest,
    job_id: str | None = None,
    deadline: float = math.inf,
) -> tuple[Job, OutgoingMessage]:
    """The request checked (metadata, input) and its job encoded: the job without its
    input (the message carries it), so the decoded input can be let go."""
    check_metadata(job_request.metadata, state.settings.max_metadata_bytes)
    sent = [
        name
        for name, value in (
            ("input", job_request.input is not msgspec.UNSET),
            ("input_ref", job_request.input_ref is not None),
            ("input_url", job_request.input_url is not None),
        )
        if value
    ]
    if len(sent) != 1:
        raise _one_input(
            f"send one of input, input_ref (an upload's reference) and input_url, not {' and '.join(sent)}"
            if sent
            else "input (or input_ref, an upload's reference, or input_url) is required"
        )
    if job_request.input_format == "jsonl":
        check_json_lines(state, job_request)
    if job_request.input_ref is not None:
        check_input_ref(state, tenant, job_request.input_ref)
    elif job_request.input is not msgspec.UNSET:
        check_input(state, model, job_request.input, deadline)
    job = new_job(state, model, tenant, job_request, job_id)
    return msgspec.structs.replace(job, input=None), encoded(job, tenant.weight)


def new_job(
    state: IngressState, model: str, tenant: Tenant, job_request: JobRequest, job_id: str | None = None
) -> Job:
    # Rounded, not truncated: a worker's queue wait measured from it is then unbiased.
    submitted_at_ms = round(time.time() * 1000)
    # The request's ttl_s, else the model's default (models.yaml `jobs.default_ttl_s`).
    ttl_s = (
        job_request.ttl_s
        if job_request.ttl_s is not None
        else state.catalogue.entry(model).jobs.default_ttl_s
    )
    return Job(
        id=job_id or str(uuid.uuid4()),
        model=model,
        input=None if job_request.input is msgspec.UNSET else job_request.input,
        input_ref=job_request.input_ref,
        input_url=job_request.input_url,
        input_format=job_request.input_format,
        callback_url=job_request.callback_url,
        priority=job_request.priority,
        metadata=job_request.metadata,
        submitted_at_ms=submitted_at_ms,
        deadline_ms=None if ttl_s is None else submitted_at_ms + round(ttl_s * 1000),
        owner=tenant.owner,
        tenant=tenant.name,
    )


def check_json_lines(state: IngressState, job_request: JobRequest) -> None:
    """A JSON Lines job reads its records from a reference and writes its output to the store."""
    if job_request.input is not msgspec.UNSET:
        raise _one_input(
            'input_format "jsonl" reads its records from input_ref or input_url, one per line; '
            "an inline input is one JSON value (leave input_format out)"
        )
    if state.uploads is None:
        raise Problem(
            422,
            "uploads-off",
            "Unprocessable Content",
            'input_format "jsonl" cannot be used: its output is written to the object store, '
            "and there is none on this deployment (no S3_ENDPOINT_URL)",
        )


def _one_input(detail: str) -> Problem:
    return Problem(422, "validation-error", "Unprocessable Content", f"invalid job request: {detail}")


def check_metadata(metadata: dict[str, object], max_bytes: int) -> None:
    """Metadata lives in the job's record for RESULT_TTL_S and rides on every event."""
    size = len(msgspec.json.encode(metadata))
    if size > max_bytes:
        raise Problem(
            413,
            "metadata-too-large",
            "Content Too Large",
            f"metadata of {size} bytes (as JSON) exceeds {max_bytes} (MAX_METADATA_BYTES)",
            extensions={"limit": "MAX_METADATA_BYTES", "allowed": max_bytes},
        )


def encoded(job: Job, tenant_weight: float) -> OutgoingMessage:
    """The job's message, before anything is written: a job that cannot be encoded leaves
    no record behind."""
    try:
        return job_message(job, tenant_weight=tenant_weight)
    except (msgspec.EncodeError, OverflowError, RecursionError) as exc:
        raise Problem(
            422, "unencodable-job", "Unprocessable Content", f"the job cannot be encoded: {exc}"
        ) from exc


def check_input(state: IngressState, model: str, job_input: object, deadline: float = math.inf) -> None:
    """The model's input schema (models.yaml), before anything is queued."""
    try:
        problem = state.input_schemas.problem(model, job_input, deadline)
    except ValidationBudgetExceeded as exc:
        budget_ms = state.settings.input_validation_budget_ms
        raise Problem(
            422,
            "input-too-complex",
            "Unprocessable Content",
            f"checking the input against {model}'s input schema took over {budget_ms:g} ms "
            "(INPUT_VALIDATION_BUDGET_MS); send a smaller input",
            extensions={"limit": "INPUT_VALIDATION_BUDGET_MS", "allowed": budget_ms},
        ) from exc
    if problem is not None:
        pointer, message = problem
        raise Problem(
            422,
            "invalid-input",
            "Unprocessable Content",
            f"input does not match {model}'s input schema at {pointer}: {message}",
            errors=[{"pointer": pointer, "detail": message}],
        )


async def check_callback(state: IngressState, callback_url: str | None) -> None:
    """The callback URL through the guard, or, without one, a way to learn the result."""
    if callback_url is not None:
        await _check_callback_url(state, callback_url)
    elif state.records is None:
        raise Problem(
            422,
            "callback-url-required",
            "Unprocessable Content",
            "callback_url is required here: job records are off (REDIS_URL=off), so a result "
            "could not be polled or waited for",
            errors=[{"field": "callback_url", "detail": "required when REDIS_URL=off"}],
        )


async def _check_callback_url(state: IngressState, callback_url: str) -> None:
    await _check_url(state, callback_url, "callback_url", "invalid-callback-url")


async def check_input_url(state: IngressState, input_url: str) -> None:
    """A job's `input_url` through the same guard as callbacks: the worker fetches it."""
    await _check_url(state, input_url, "input_url", "invalid-input-url")


async def _check_url(state: IngressState, url: str, field: str, slug: str) -> None:
    try:
        await check_callback_url(url, state.settings.callback_allow, state.resolver, field)
    except CallbackUrlRejected as exc:
        raise Problem(
            422,
            slug,
            "Unprocessable Content",
            str(exc),
            errors=[{"field": field, "detail": str(exc)}],
        ) from exc
    except ResolutionUnavailable as exc:
        raise state.unavailable("dns-unavailable", f"{exc}; the URL may be fine: retry later") from exc
