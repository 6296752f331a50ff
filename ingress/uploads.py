"""Inputs by reference: `POST /v1/uploads` presigns a PUT straight to the object store
(the ingress never holds the bytes), and a job names the upload as `input_ref`. A job may
name only its own tenant's uploads (the key carries the owner), and only one that exists
and fits UPLOAD_MAX_BYTES; the worker checks it against the model's schema when it reads
it. The store unreachable: 503, nothing accepted."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ingress.auth import authenticate
from ingress.problems import Problem
from ingress.state import IngressState, ingress_state
from ingress.tenant_limits import take_rate
from object_store.store import ANONYMOUS_OWNER, ObjectStore, StoreUnavailable, owner_of, upload_key
from tenants.registry import Tenant

STORE_RETRY_AFTER_S = "5"


async def create_upload(request: Request) -> Response:
    state = ingress_state(request)
    tenant = authenticate(request, state.settings.tenants)
    store = _store(state)
    limits = await take_rate(state, tenant, 1, "uploads")
    key = upload_key(tenant.owner)
    ttl_s = state.settings.upload_url_ttl_s
    try:
        url = await store.presigned_put(key, ttl_s)
    except StoreUnavailable as exc:
        raise _unavailable(exc) from exc
    expires_at = datetime.fromtimestamp(time.time() + ttl_s, UTC).isoformat(timespec="seconds")
    return JSONResponse(
        {
            "upload_url": url,
            "input_ref": key,
            "expires_at": expires_at,
            "max_bytes": state.settings.upload_max_bytes,
        },
        status_code=201,
        headers=limits,
    )


def check_input_ref(state: IngressState, tenant: Tenant, ref: str) -> None:
    """The reference's form and owner, before the store is asked."""
    if state.uploads is None:
        raise Problem(
            422,
            "uploads-off",
            "Unprocessable Content",
            "input_ref cannot be used: uploads are off on this deployment (no S3_ENDPOINT_URL); send input",
        )
    if owner_of(ref) != (tenant.owner or ANONYMOUS_OWNER):
        raise Problem(
            422,
            "invalid-input-ref",
            "Unprocessable Content",
            "input_ref is not an upload of this API key's (POST /v1/uploads makes one)",
        )


async def check_uploaded(state: IngressState, ref: str) -> int:
    """The upload exists and fits UPLOAD_MAX_BYTES; its size."""
    try:
        size = await _store(state).size(ref)
    except StoreUnavailable as exc:
        raise _unavailable(exc) from exc
    if size is None:
        raise Problem(
            422,
            "input-ref-not-found",
            "Unprocessable Content",
            f"nothing was uploaded to {ref} (PUT the bytes to its upload_url first)",
        )
    allowed = state.settings.upload_max_bytes
    if size > allowed:
        raise Problem(
            413,
            "payload-too-large",
            "Content Too Large",
            f"the upload holds {size} bytes, over UPLOAD_MAX_BYTES ({allowed})",
            extensions={"limit": "UPLOAD_MAX_BYTES", "allowed": allowed},
        )
    return size


def _store(state: IngressState) -> ObjectStore:
    if state.uploads is None:
        raise Problem(
            501,
            "uploads-off",
            "Not Implemented",
            "uploads are off on this deployment: it has no object store (S3_ENDPOINT_URL)",
        )
    return state.uploads


def _unavailable(exc: StoreUnavailable) -> Problem:
    return Problem(
        503,
        "store-unavailable",
        "Service Unavailable",
        f"the object store did not answer: {exc}",
        headers={"Retry-After": STORE_RETRY_AFTER_S},
    )
