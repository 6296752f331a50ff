"""The one builder of a job's AMQP message, used wherever a job is put on a queue: the
ingress (first attempt), the worker (a retry), replay (out of the parking lot), the bench
and tests. Every copy of a job on the broker carries the same id, priority and type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from wire.envelope import (
    AMQP_PRIORITY,
    ATTEMPT_HEADER,
    DEADLINE_HEADER,
    INPUT_BYTES_HEADER,
    MAX_TENANT_WEIGHT,
    TENANT_HEADER,
    TENANT_WEIGHT_HEADER,
    Job,
    encode,
)
from wire.outgoing import OutgoingMessage


def first_attempt_headers(job: Job, tenant_weight: float = 1.0) -> dict[str, Any]:
    """Headers of a job's first delivery: attempt 1 and, when it has them, its deadline,
    its tenant and its tenant's weight (1 goes unsaid)."""
    headers: dict[str, Any] = {ATTEMPT_HEADER: 1}
    if job.deadline_ms:
        headers[DEADLINE_HEADER] = job.deadline_ms
    if job.tenant:
        headers[TENANT_HEADER] = job.tenant
    if tenant_weight != 1.0:
        headers[TENANT_WEIGHT_HEADER] = tenant_weight
    return headers


def tenant_of(headers: Mapping[str, Any]) -> str:
    """The tenant a delivery says submitted it ("" for none)."""
    tenant = headers.get(TENANT_HEADER, "")
    return tenant if isinstance(tenant, str) else ""


def weight_of(headers: Mapping[str, Any]) -> float:
    """The fair-share weight a delivery carries: 1 when absent or out of (0, MAX_TENANT_WEIGHT]."""
    weight = headers.get(TENANT_WEIGHT_HEADER, 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= MAX_TENANT_WEIGHT:
        return 1.0
    return float(weight)


def job_message(
    job: Job,
    headers: Mapping[str, Any] | None = None,
    *,
    body: bytes | None = None,
    expiration_ms: int | None = None,
    tenant_weight: float = 1.0,
) -> OutgoingMessage:
    """The message for `job`: `body` is the bytes it arrived as, when republishing it
    unchanged; `headers` default to a first attempt's (with `tenant_weight`)."""
    return OutgoingMessage(
        encode(job) if body is None else body,
        message_id=job.id,
        correlation_id=job.id,
        priority=AMQP_PRIORITY[job.priority],
        headers=first_attempt_headers(job, tenant_weight) if headers is None else dict(headers),
        type="job",
        expiration_ms=expiration_ms,
    )


def with_input_bytes(message: OutgoingMessage, size: int) -> OutgoingMessage:
    """The job's message saying how large the input it names is (retries and replays keep
    the header): a worker's batch holds that much once it reads the input."""
    return dataclasses.replace(message, headers={**(message.headers or {}), INPUT_BYTES_HEADER: size})


def input_bytes(headers: Mapping[str, Any]) -> int:
    """The named input's bytes a delivery says it has; 0 when it names none."""
    size = headers.get(INPUT_BYTES_HEADER, 0)
    return size if isinstance(size, int) and size > 0 else 0
