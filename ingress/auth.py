"""Bearer-token authentication against `API_KEYS`, in constant time.

A job belongs to the key that submitted it: its record stores the key's digest (never
the key), and only a request presenting the same key may read or cancel it.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from ingress.problems import Problem


def owner_of(key: str) -> str:
    """The digest a job record keeps of the key that owns it."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def authenticate(request: Request, api_keys: tuple[str, ...]) -> str:
    """The caller's owner digest ("" with auth off); 401 unless the bearer token matches a key."""
    if not api_keys:
        return ""
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
    return owner_of(token.strip())
