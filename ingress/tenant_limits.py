"""A tenant's limits at submit, held in Redis so every ingress process shares them.

- `rate_per_s` + `burst`: a token bucket on submitted jobs (a batch takes one token per
  job), and another as large on uploads (`POST /v1/uploads`: each may put UPLOAD_MAX_BYTES
  in the store). Over it: 429 `rate-limited` with `Retry-After` (when the tokens will be there)
  and the IETF RateLimit headers, which every answer to a limited tenant's submission
  carries: `RateLimit-Policy: "burst";q=<burst>;w=<seconds to refill>` and
  `RateLimit: "burst";r=<tokens left>;t=<seconds to full>`. A batch larger than the
  burst could never pass: 422 `batch-over-burst`.
- `max_queued`: jobs queued or running at once. Over it: 429 `quota-exceeded`. A job
  counts from its acceptance to its ending (or cancel); one lost without an ending
  stops counting when its record would expire.

A refusal comes before anything is written or queued, so a 429 is never followed by the
job running. While Redis does not answer, `TENANT_LIMITS_FAIL_OPEN` decides: accept the
jobs unchecked (1, the default: limits share capacity, they are not a security
boundary) or answer 503 + Retry-After (0).
"""

from __future__ import annotations

import contextlib
import logging
import math

from ingress.problems import Problem
from ingress.state import IngressState
from job_records.store import RecordsUnavailable
from tenants.registry import Tenant

logger = logging.getLogger(__name__)


async def take_rate(state: IngressState, tenant: Tenant, jobs: int, what: str = "jobs") -> dict[str, str]:
    """Tokens for `jobs` jobs (or uploads: `what`, a bucket of its own), or 429; returns the
    RateLimit headers for the answer."""
    if tenant.rate_per_s is None or tenant.burst is None or state.records is None:
        return {}
    rate, burst = tenant.rate_per_s, tenant.burst
    if jobs > burst:
        raise _refused(
            state,
            tenant,
            Problem(
                422,
                "batch-over-burst",
                "Unprocessable Content",
                f"a batch of {jobs} jobs can never fit this API key's burst of {burst}; send at most {burst}",
                extensions={"limit": "burst", "allowed": burst},
            ),
        )
    try:
        bucket = tenant.name if what == "jobs" else f"{tenant.name}:{what}"
        take = await state.records.take_tokens(bucket, rate, burst, jobs)
    except RecordsUnavailable as exc:
        _unchecked(state, tenant, exc)
        return {}
    headers = {
        "RateLimit-Policy": f'"burst";q={burst};w={math.ceil(burst / rate)}',
        "RateLimit": f'"burst";r={math.floor(take.left)};t={math.ceil((burst - take.left) / rate)}',
    }
    if not take.taken:
        raise _refused(
            state,
            tenant,
            Problem(
                429,
                "rate-limited",
                "Too Many Requests",
                f"this API key may submit {rate:g} {what}/s (burst {burst}); {jobs} more are possible in "
                f"{take.wait_s:.1f} s",
                headers={**headers, "Retry-After": str(max(1, math.ceil(take.wait_s)))},
                extensions={"limit": "rate_per_s", "allowed": rate},
            ),
        )
    return headers


async def reserve_queued(state: IngressState, tenant: Tenant, job_ids: list[str]) -> None:
    """Count the jobs against the tenant's max_queued, all or none, or 429."""
    if tenant.max_queued is None or state.records is None:
        return
    try:
        reserved, held = await state.records.reserve_queued(tenant.owner, job_ids, tenant.max_queued)
    except RecordsUnavailable as exc:
        _unchecked(state, tenant, exc)
        return
    if not reserved:
        raise _refused(
            state,
            tenant,
            Problem(
                429,
                "quota-exceeded",
                "Too Many Requests",
                f"this API key has {held} jobs queued or running, its max_queued is {tenant.max_queued}; "
                f"{len(job_ids)} more would exceed it: wait for some to end",
                headers={"Retry-After": str(state.settings.retry_after_s)},
                extensions={"limit": "max_queued", "allowed": tenant.max_queued, "queued": held},
            ),
        )


async def release_queued(state: IngressState, tenant: Tenant, job_ids: list[str]) -> None:
    """Jobs reserved and then not queued: they stop counting (best effort: else they
    stop when their records would expire)."""
    if tenant.max_queued is None or state.records is None:
        return
    with contextlib.suppress(RecordsUnavailable):
        await state.records.release_queued(tenant.owner, job_ids)


def _unchecked(state: IngressState, tenant: Tenant, exc: RecordsUnavailable) -> None:
    if not state.settings.tenant_limits_fail_open:
        state.metrics.tenant_refused.labels(tenant.name, "limits-unavailable").inc()
        raise state.unavailable(
            "limits-unavailable", "this API key's limits cannot be checked right now; retry later"
        ) from exc
    if not exc.skipped:
        logger.warning("tenant %s: limits not checked, Redis unavailable: %s", tenant.name, exc)


def _refused(state: IngressState, tenant: Tenant, problem: Problem) -> Problem:
    state.metrics.tenant_refused.labels(tenant.name, problem.slug).inc()
    return problem
