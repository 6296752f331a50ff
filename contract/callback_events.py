"""The terminal event a job ends with, as a message for the callbacks queue.

Built by the worker (succeeded, failed, expired) and by the ingress (canceled), so both
send the same Standard Webhooks payload with the same stable `webhook-id`.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import msgspec

from contract.broker import OutgoingMessage
from contract.envelope import (
    ATTEMPT_HEADER,
    CallbackDelivery,
    CallbackEvent,
    EventData,
    EventType,
    Job,
    JobStatus,
    JobTimings,
    decode_callback_delivery,
    encode,
    webhook_id_for,
)
from contract.settlement import Publish
from contract.topology import Topology


def callback_for(
    job: Job,
    status: JobStatus,
    attempt: int,
    timings: JobTimings,
    now_s: float,
    topology: Topology,
    output: Any = None,
    error: str | None = None,
) -> Publish:
    event_type: EventType = f"job.{status}"  # type: ignore[assignment]
    event = CallbackEvent(
        type=event_type,
        timestamp=datetime.fromtimestamp(now_s, UTC).isoformat(),
        data=EventData(
            id=job.id,
            model=job.model,
            status=status,
            attempts=attempt,
            metadata=job.metadata,
            timings=timings,
            output=output,
            error=error,
        ),
    )
    delivery = CallbackDelivery(
        webhook_id=webhook_id_for(job.id, event_type),
        callback_url=job.callback_url,
        event=event,
        job=None if job.callback_url else job,
    )
    message = OutgoingMessage(
        encode(delivery),
        message_id=delivery.webhook_id,
        correlation_id=job.id,
        headers={ATTEMPT_HEADER: 1},
        type=event_type,
    )
    return Publish(message, topology.callbacks_queue, exchange=topology.job_outcomes_exchange(job.model))


def carrying_job(publish: Publish, job: Job) -> Publish:
    """The same event, also carrying its job: the dispatcher then records the job's ending
    (the worker could not reach the job records)."""
    delivery = msgspec.structs.replace(decode_callback_delivery(publish.message.body), job=job)
    message = dataclasses.replace(publish.message, body=encode(delivery))
    return dataclasses.replace(publish, message=message)


def canceled_callback(job: Job, now_s: float, topology: Topology) -> Publish:
    """`job.canceled`: the job never ran, so no attempts and no model time."""
    waited_ms = max(0.0, now_s * 1000 - job.submitted_at_ms)
    timings = JobTimings(queued_ms=round(waited_ms, 3), inference_ms=0.0, batch_size=0)
    return callback_for(job, "canceled", 0, timings, now_s, topology, error="canceled by the caller")
