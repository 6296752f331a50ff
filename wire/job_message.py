"""The one builder of a job's AMQP message, used wherever a job is put on a queue: the
ingress (first attempt), the worker (a retry), replay (out of the parking lot), the bench
and tests. Every copy of a job on the broker carries the same id, priority and type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from wire.envelope import AMQP_PRIORITY, ATTEMPT_HEADER, DEADLINE_HEADER, INPUT_BYTES_HEADER, Job, encode
from wire.outgoing import OutgoingMessage


def first_attempt_headers(job: Job) -> dict[str, Any]:
    """Headers of a job's first delivery: attempt 1 and, when it has one, its deadline."""
    return {ATTEMPT_HEADER: 1, **({DEADLINE_HEADER: job.deadline_ms} if job.deadline_ms else {})}


def job_message(
    job: Job,
    headers: Mapping[str, Any] | None = None,
    *,
    body: bytes | None = None,
    expiration_ms: int | None = None,
) -> OutgoingMessage:
    """The message for `job`: `body` is the bytes it arrived as, when republishing it
    unchanged; `headers` default to a first attempt's."""
    return OutgoingMessage(
        encode(job) if body is None else body,
        message_id=job.id,
        correlation_id=job.id,
        priority=AMQP_PRIORITY[job.priority],
        headers=first_attempt_headers(job) if headers is None else dict(headers),
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
