"""Bearer-token authentication against the deployment's tenants (`API_KEYS`, `TENANTS_FILE`).

A job belongs to the key that submitted it: its record stores the key's digest (never
the key), and only a request presenting the same key may read or cancel it. With no
key configured authentication is off and every caller is the one anonymous tenant.
"""

from __future__ import annotations

from starlette.requests import Request

from ingress.problems import Problem
from tenants.registry import NO_AUTH, Tenant, Tenants


def authenticate(request: Request, tenants: Tenants) -> Tenant:
    """The calling tenant; 401 unless the bearer token is one of theirs."""
    if tenants.auth_off:
        return NO_AUTH
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    tenant = tenants.find(token.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "missing or invalid API key; send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="inferq"'},
        )
    return tenant


def require_model(tenant: Tenant, model: str) -> None:
    """403 when the tenant's `models` leave this one out."""
    if tenant.models is not None and model not in tenant.models:
        raise Problem(
            403,
            "model-not-allowed",
            "Forbidden",
            f"this API key may use {list(tenant.models)}, not {model!r}",
        )
