"""What a job's outcome turns into on the broker: the messages to publish before the ack.

    succeeded              -> callback job.succeeded
    expired (deadline)     -> callback job.expired
    transient failure      -> the job, attempt + 1, to its retry tier's delay queue
    permanent / exhausted  -> the job to the parking lot (reason, error, history)
                              and callback job.failed
    undecodable body       -> the body to the parking lot (nobody to call back)

The callback itself is built by `wire.callback_events`.

Pure: builds messages, publishes nothing, so every branch is tested without a broker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from wire.envelope import ATTEMPT_HEADER, HISTORY_HEADER, PARK_REASON_HEADER, Job
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage, Publish
from wire.topology import Topology


def history_with(headers: Mapping[str, Any], attempt: int, error: str, now_ms: int) -> str:
    raw = headers.get(HISTORY_HEADER)
    history: list[dict[str, Any]] = json.loads(raw) if isinstance(raw, str | bytes) else []
    history.append({"attempt": attempt, "error": error[:500], "at_ms": now_ms})
    return json.dumps(history)


def retry_for(
    body: bytes,
    job: Job,
    headers: Mapping[str, Any],
    attempt: int,
    error: str,
    delay_s: float,
    expiration_ms: int,
    topology: Topology,
    now_ms: int,
) -> Publish:
    retried_headers = {
        **headers,
        ATTEMPT_HEADER: attempt + 1,
        HISTORY_HEADER: history_with(headers, attempt, error, now_ms),
    }
    message = job_message(job, retried_headers, body=body, expiration_ms=expiration_ms)
    queue = topology.job_retry_queue(job.model, delay_s, job.priority)
    return Publish(message, queue, exchange=topology.job_outcomes_exchange(job.model))


def handed_back(body: bytes, job: Job, headers: Mapping[str, Any], topology: Topology) -> Publish:
    """A job given back unrun, on its own, so that the chunk it came in can be acked
    (`wire.job_chunk`): through the model's shortest delay tier back to its queue, with its
    attempt unburned."""
    delay_s = min(topology.job_retry_schedule(job.model).distinct_delays_s())
    message = job_message(job, headers, body=body)
    queue = topology.job_retry_queue(job.model, delay_s, job.priority)
    return Publish(message, queue, exchange=topology.job_outcomes_exchange(job.model))


def parked(
    body: bytes,
    message_id: str,
    headers: Mapping[str, Any],
    reason: str,
    model: str,
    topology: Topology,
    attempt: int | None = None,
    error: str | None = None,
    now_ms: int = 0,
) -> Publish:
    parked_headers = {**headers, PARK_REASON_HEADER: reason[:1000]}
    if attempt is not None and error is not None:
        parked_headers[HISTORY_HEADER] = history_with(headers, attempt, error, now_ms)
    message = OutgoingMessage(body, message_id=message_id, headers=parked_headers)
    return Publish(message, topology.parking_queue(model), exchange=topology.job_outcomes_exchange(model))
