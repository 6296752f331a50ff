"""What every submission route does before and around its jobs: the caller's tenant and
model, the body read under its limit and counted in flight, the tenant's rate taken for
the jobs, and each refusal counted. The single-job and batch routes differ only in what
they check inside the body and how they accept it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import authenticate, require_model
from ingress.inflight_bytes import InflightFull, Reservation
from ingress.job_checks import served_model
from ingress.problems import Problem
from ingress.request_body import declared_length, read_limited_body, require_json_content_type
from ingress.request_headers import idempotency_key
from ingress.state import IngressState, ingress_state
from ingress.tenant_limits import take_rate
from tenants.registry import Tenant


@dataclass
class SubmissionRequest:
    """A submission's request past the checks every route shares, its body read; the
    reservation holds the body's in-flight bytes until the submission lets it go."""

    tenant: Tenant
    model: str
    key: str | None
    body: bytes
    reservation: Reservation


async def submission_request(
    request: Request, state: IngressState, max_body_bytes: int, limit: str
) -> SubmissionRequest:
    """Cheapest first: the caller, the model, the content type and the key, then the body."""
    tenant = authenticate(request, state.settings.tenants)
    model = served_model(state, request.path_params["model"])
    require_model(tenant, model)
    require_json_content_type(request)
    key = idempotency_key(request)
    try:
        reservation = state.inflight.reserve(declared_length(request) or max_body_bytes)
    except InflightFull as exc:
        raise state.unavailable("ingress-busy", f"{exc}; retry later") from exc
    try:
        body = await read_limited_body(request, max_body_bytes, limit)
    except BaseException:
        reservation.release()
        raise
    return SubmissionRequest(tenant, model, key, body, reservation)


class Submitted(Protocol):
    """A checked submission: whose it is, how many jobs it holds, and what it holds."""

    @property
    def tenant(self) -> Tenant: ...

    @property
    def job_count(self) -> int: ...

    def let_go(self) -> None: ...


SubmittedT = TypeVar("SubmittedT", bound=Submitted)


async def handle_submission(
    request: Request,
    checked: Callable[[Request, IngressState], Awaitable[SubmittedT]],
    accept: Callable[[IngressState, SubmittedT], Awaitable[Response]],
) -> Response:
    """The submission checked, its jobs taken from the tenant's rate, then accepted; the
    rate's headers go on the answer and every refusal is counted by status."""
    state = ingress_state(request)
    try:
        submission = await checked(request, state)
        try:
            rate_headers = await take_rate(state, submission.tenant, submission.job_count)
        except BaseException:
            submission.let_go()
            raise
        response = await accept(state, submission)
        response.headers.update(rate_headers)
        return response
    except Problem as problem:
        state.metrics.requests_rejected.labels(str(problem.status)).inc()
        raise
