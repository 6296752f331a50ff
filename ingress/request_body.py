"""Reading a job request body within the size limit, and decoding it.

The limit holds for chunked bodies too: the stream is counted as it arrives and
reading stops at the first byte over the limit, so a client cannot make the ingress
buffer more than `max_body_bytes` by leaving out Content-Length.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.requests import Request

from contract.envelope import Priority
from ingress.problems import Problem


class JobRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    input: Any
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


async def read_limited_body(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Problem(400, "bad-request", "Bad Request", f"Content-Length {declared!r} is invalid")
        if int(declared) > max_body_bytes:
            raise _too_large(int(declared), max_body_bytes)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_body_bytes:
            raise _too_large(received, max_body_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> Problem:
    return Problem(
        413,
        "payload-too-large",
        "Content Too Large",
        f"request body of at least {size} bytes exceeds the limit of {limit} bytes (MAX_BODY_BYTES)",
    )


def decode_job_request(body: bytes) -> JobRequest:
    try:
        return msgspec.json.decode(body, type=JobRequest)
    except msgspec.ValidationError as exc:
        raise Problem(
            422,
            "validation-error",
            "Unprocessable Content",
            f"invalid job request: {exc}",
            errors=[{"detail": str(exc)}],
        ) from exc
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed-json", "Bad Request", f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # msgspec's own depth limit (about 1,000 levels)
        raise Problem(
            400, "malformed-json", "Bad Request", "body nests JSON arrays or objects too deeply"
        ) from exc
