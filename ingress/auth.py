"""Bearer-token authentication against `API_KEYS`, in constant time."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from ingress.problems import Problem


def authenticate(request: Request, api_keys: tuple[str, ...]) -> None:
    """Raise 401 unless auth is off (no keys) or the bearer token matches a key."""
    if not api_keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode()
    # Compare against every key without stopping early, so timing reveals nothing.
    matched = False
    for key in api_keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "missing or invalid API key; send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="inferq"'},
        )
