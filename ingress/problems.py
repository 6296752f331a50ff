"""RFC 9457 problem details: the one shape every HTTP error of the ingress takes.

Handlers raise `Problem`; one exception handler renders it, so no handler builds an
error response by hand and nothing is published once a Problem is raised.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_BASE = "https://inferq.dev/problems/"


class Problem(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors
        # Extension members (RFC 9457 section 3.2), e.g. a job's current status.
        self.extensions = extensions or {}


def problem_response(problem: Problem, instance: str) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + problem.slug,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "instance": instance,
    }
    if problem.errors:
        body["errors"] = problem.errors
    body.update(problem.extensions)
    return Response(
        msgspec.json.encode(body),
        status_code=problem.status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=problem.headers,
    )


async def handle_problem(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, Problem):  # registered for Problem only
        raise exc
    return problem_response(exc, request.url.path)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405s, in the same problem+json shape."""
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    problem = Problem(
        exc.status_code,
        slug,
        str(exc.detail),
        f"{request.method} {request.url.path}: {exc.detail}",
        headers=dict(exc.headers or {}),
    )
    return problem_response(problem, request.url.path)
