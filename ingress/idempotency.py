"""An Idempotency-Key around an acceptance: claimed first, then released when nothing was
accepted, kept as uncertain when something may be queued, or completed with the answer's
status. A single job and a batch differ only in the id the key names (the job's or the
batch's) and in which refusal means "may be queued".
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable

from starlette.responses import Response

from ingress.problems import Problem
from ingress.state import IngressState
from job_records.store import KeyClaim, RecordsUnavailable

logger = logging.getLogger(__name__)


async def claim_key(
    state: IngressState, owner: str, key: str, fingerprint: str, claimant_id: str, noun: str
) -> KeyClaim:
    """The key reserved for `claimant_id`, or the claim that answers it (a replay, or a
    claim left uncertain); a key used with another body or still in flight is refused."""
    records = state.require_records()
    try:
        claim = await records.reserve_key(owner, key, fingerprint, claimant_id)
    except RecordsUnavailable as exc:
        raise state.unavailable(
            "idempotency-unavailable",
            "the job records are unavailable, so an Idempotency-Key cannot be honoured",
        ) from exc
    if claim.outcome == "mismatch":
        raise Problem(
            422,
            "idempotency-key-reused",
            "Unprocessable Content",
            f"this Idempotency-Key was used with a different request body; use a new key for a new {noun}",
        )
    if claim.outcome == "in_flight":
        raise Problem(
            409,
            "idempotency-key-in-flight",
            "Conflict",
            "a request with this Idempotency-Key is still being accepted; retry shortly",
            headers={"Retry-After": "1"},
        )
    return claim


async def accepted_under_key(
    state: IngressState,
    owner: str,
    key: str,
    claimant_id: str,
    ttl_s: int,
    accepting: Awaitable[Response],
    maybe_queued: type[Problem],
) -> Response:
    """`accepting`'s answer; on a refusal the key is freed again, unless the refusal is
    `maybe_queued`: then it is kept, so the retry sends the same ids again."""
    records = state.require_records()
    try:
        return await accepting
    except maybe_queued:
        with contextlib.suppress(RecordsUnavailable):
            await records.keep_key_uncertain(owner, key, claimant_id, ttl_s)
        raise
    except Problem:
        with contextlib.suppress(RecordsUnavailable):
            await records.release_key(owner, key, claimant_id)  # nothing accepted: free again
        raise


async def complete_key(
    state: IngressState, owner: str, key: str, claimant_id: str, status_code: int, ttl_s: int
) -> None:
    """The key answers `status_code` from now on; if Redis is away, its lease runs out and
    a retry after that is accepted anew (logged)."""
    try:
        if not await state.require_records().complete_key(owner, key, claimant_id, status_code, ttl_s):
            logger.warning("%s accepted after its Idempotency-Key's lease ran out", claimant_id)
    except RecordsUnavailable as exc:
        logger.warning("%s accepted, but its Idempotency-Key was not completed: %s", claimant_id, exc)
