"""The terminal event a job ends with, as a message for the callbacks queue.

Built by the worker (succeeded, failed, expired) and by the ingress (canceled), so both
send the same Standard Webhooks payload with the same stable `webhook-id`. The worker
settles a batch with `combine_callbacks`: its events for one callback host go out as
one CallbackBatch message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from wire.envelope import (
    ATTEMPT_HEADER,
    CALLBACK_BATCH_TYPE,
    EXPRESS_HEADER,
    CallbackDelivery,
    CallbackEvent,
    EventData,
    EventType,
    Job,
    JobStatus,
    JobTimings,
    OutputRef,
    callback_batch_body,
    decode_callback_delivery,
    encode,
    webhook_id_for,
)
from wire.outgoing import OutgoingMessage, Publish
from wire.topology import Topology


def callback_for(
    job: Job,
    status: JobStatus,
    attempt: int,
    timings: JobTimings,
    now_s: float,
    topology: Topology,
    output: Any = None,
    error: str | None = None,
    output_ref: OutputRef | None = None,
) -> Publish:
    """The job's ending as a callback event; a stored output goes as its reference."""
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
            output_url=None if output_ref is None else output_ref.url,
            output_size=None if output_ref is None else output_ref.size,
            output_sha256=None if output_ref is None else output_ref.sha256,
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
    return Publish(
        message,
        topology.callbacks_queue,
        exchange=topology.job_outcomes_exchange(job.model),
        combine_key=callback_host(job.callback_url or ""),
    )


def callback_host(callback_url: str) -> str:
    """The host a callback goes to ("" for a URL with none): what the dispatcher's slots
    and breakers are kept by, and what a batch message shares."""
    try:
        return (urlsplit(callback_url).hostname or "").lower()
    except ValueError:
        return ""


def combine_callbacks(publishes: Sequence[Publish]) -> Publish:
    """One callbacks-queue message for several events of one host (`settle`'s `combine`);
    a lone event stays the message it is."""
    if len(publishes) == 1:
        return publishes[0]
    first = publishes[0]
    message = OutgoingMessage(
        callback_batch_body([p.message.body for p in publishes]),
        message_id=f"batch_{len(publishes)}_{first.message.message_id}",
        headers={ATTEMPT_HEADER: 1},
        type=CALLBACK_BATCH_TYPE,
    )
    return Publish(message, first.routing_key, exchange=first.exchange)


def carrying_job(publish: Publish, job: Job) -> Publish:
    """The same event, also carrying its job: the dispatcher then records the job's ending
    (the worker could not reach the job records)."""
    delivery = msgspec.structs.replace(decode_callback_delivery(publish.message.body), job=job)
    message = dataclasses.replace(publish.message, body=encode(delivery))
    return dataclasses.replace(publish, message=message)


def expressed(publish: Publish) -> Publish:
    """The event's broker copy, marked: the event went onto the express lane as well."""
    message = dataclasses.replace(
        publish.message, headers={**(publish.message.headers or {}), EXPRESS_HEADER: 1}
    )
    return dataclasses.replace(publish, message=message)


def canceled_callback(job: Job, now_s: float, topology: Topology) -> Publish:
    """`job.canceled`: the job never ran, so no attempts and no model time."""
    waited_ms = max(0.0, now_s * 1000 - job.submitted_at_ms)
    timings = JobTimings(queued_ms=round(waited_ms, 3), inference_ms=0.0, batch_size=0)
    return callback_for(job, "canceled", 0, timings, now_s, topology, error="canceled by the caller")
