"""Reading a job request body within the size limit, and decoding it within its budget.

The limit holds for chunked bodies too: the stream is counted as it arrives and
reading stops at the first byte over the limit, so a client cannot make the ingress
buffer more than `max_body_bytes` by leaving out Content-Length. The body's JSON shape
(depth, number of values) is checked on its bytes before it is decoded
(`ingress.json_budget`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.requests import Request

from ingress.json_budget import JsonBudget
from ingress.problems import Problem
from wire.envelope import InputFormat, Priority

_Body = TypeVar("_Body")

# ASCII digits, at most 18 (int() refuses '²', which str.isdigit() takes, and over 4,300 digits).
_DIGITS = re.compile(r"[0-9]{1,18}")


class JobRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Exactly one of the three: the input itself, an upload's reference (POST /v1/uploads),
    # or a URL the worker fetches it from (through the callback-URL guard).
    input: Any = msgspec.UNSET
    input_ref: str | None = None
    input_url: str | None = None
    # "jsonl": the referenced input is JSON Lines, one record per line, and the output is
    # JSON Lines in the object store, line for line.
    input_format: InputFormat = "json"
    # Optional: without it the caller polls GET /v1/jobs/{id} or waits (Prefer: wait=N).
    callback_url: str | None = None
    priority: Priority = "normal"
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # Seconds the job may wait; past that it is not run and the caller gets job.expired.
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)] | None = None


def require_json_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported Media Type",
            f"Content-Type {content_type or '(none)'!r} is not accepted; send application/json",
        )


async def read_limited_body(request: Request, max_body_bytes: int, limit: str = "MAX_BODY_BYTES") -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared):
            raise Problem(400, "bad-request", "Bad Request", f"Content-Length {declared[:40]!r} is invalid")
        if int(declared) > max_body_bytes:
            raise _too_large(int(declared), max_body_bytes, limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise _too_large(received, max_body_bytes, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, allowed: int, limit: str) -> Problem:
    return Problem(
        413,
        "payload-too-large",
        "Content Too Large",
        f"request body of at least {size} bytes exceeds the limit of {allowed} bytes ({limit})",
    )


def declared_length(request: Request) -> int | None:
    """Content-Length when it is a plain decimal number (read_limited_body refuses others)."""
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and _DIGITS.fullmatch(declared) else None


def decode_job_request(body: bytes, budget: JsonBudget) -> JobRequest:
    try:
        return decode_body(body, budget, JobRequest)
    except msgspec.ValidationError as exc:
        raise Problem(
            422,
            "validation-error",
            "Unprocessable Content",
            f"invalid job request: {exc}",
            errors=[{"detail": str(exc)}],
        ) from exc


def decode_body(body: bytes, budget: JsonBudget, kind: type[_Body]) -> _Body:
    """The body as `kind`, once its JSON shape is within the budget; msgspec's
    ValidationError (the shape is JSON but not a `kind`) is the caller's to word."""
    excess = budget.excess(body)
    if excess is not None:
        status, slug, title = (
            (413, "too-many-json-values", "Content Too Large")
            if excess.limit == "MAX_JSON_VALUES"
            else (422, "json-too-deep", "Unprocessable Content")
        )
        raise Problem(
            status, slug, title, str(excess), extensions={"limit": excess.limit, "allowed": excess.allowed}
        )
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed-json", "Bad Request", f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec's own depth limit (about 1,000 levels)
        raise Problem(
            400, "malformed-json", "Bad Request", "body nests JSON arrays or objects too deeply"
        ) from exc
