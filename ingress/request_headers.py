"""The job request's optional headers: `Prefer: wait=N` (RFC 7240) and `Idempotency-Key`
(IETF httpapi draft), parsed and validated at the edge.
"""

from __future__ import annotations

import hashlib
import re

from starlette.requests import Request

from ingress.problems import Problem

MAX_WAIT_S = 60
MAX_KEY_LENGTH = 255
# The draft makes the key an sf-string: printable ASCII. Quotes are optional here.
# ASCII digits only: str.isdigit() is also true for '²', which int() refuses.
_SECONDS = re.compile(r"[0-9]+")
_KEY = re.compile(r'^"?([\x20-\x21\x23-\x7e]{1,255})"?$')


def preferred_wait_s(request: Request) -> int | None:
    """Seconds the caller prefers to wait (capped at MAX_WAIT_S), or None; a malformed
    preference is ignored, as RFC 7240 asks."""
    for header in request.headers.getlist("prefer"):
        for preference in re.split(r"[,;]", header):
            name, _, value = preference.strip().partition("=")
            seconds = value.strip()
            if name.strip().lower() == "wait" and _SECONDS.fullmatch(seconds):
                return MAX_WAIT_S if len(seconds) > 6 else min(int(seconds), MAX_WAIT_S)
    return None


def idempotency_key(request: Request) -> str | None:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    match = _KEY.match(raw.strip())
    if match is None:
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Bad Request",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters; got {raw[:40]!r}",
        )
    return match.group(1)


def request_fingerprint(model: str, body: bytes) -> str:
    """What must match for a repeated key to be a replay: the route's model and the body."""
    return hashlib.sha256(model.encode() + b"\n" + body).hexdigest()
