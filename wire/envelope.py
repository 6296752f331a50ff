"""The job envelope and the callback event: the wire formats between services.

The ingress encodes a `Job` onto the model's queue; a worker decodes it, runs the
model and encodes a `CallbackDelivery` for the dispatcher, which POSTs its `event`
(a Standard Webhooks payload) to the caller. A worker's batch sends its events for one
callback host as one `CallbackBatch` message (AMQP type CALLBACK_BATCH_TYPE): one
message per job would cost the broker and both processes a message each. Bodies carry
`schema_version` so a worker can refuse a format it does not know instead of guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar, cast

import msgspec

SCHEMA_VERSION = 1

Priority = Literal["high", "normal", "low"]
# How a referenced input is read: one JSON value, or JSON Lines (one record per line,
# streamed through the model; `ray_workers.json_lines`).
InputFormat = Literal["json", "jsonl"]
# Broker-side priorities: RabbitMQ keeps one internal sub-queue per level, so few
# levels are cheaper than the 0-255 range AMQP allows.
AMQP_PRIORITY: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
MAX_AMQP_PRIORITY = max(AMQP_PRIORITY.values())

# Our own attempt count (1 on first delivery), incremented on every republish to a
# retry tier; RabbitMQ's x-death is not used (4.x stops counting client republishes).
ATTEMPT_HEADER = "x-attempt"
# The job's deadline (wall-clock ms), when it has one; the body carries it too.
DEADLINE_HEADER = "x-deadline-ms"
# The bytes of the input a job names (`input_ref`: the upload's size; `input_url`: the most
# it may fetch), set by the ingress: a worker counts them in its batch's byte budget.
INPUT_BYTES_HEADER = "x-input-bytes"
# JSON list of {"attempt", "error", "at_ms"}: why each earlier attempt failed.
HISTORY_HEADER = "x-attempt-history"
PARK_REASON_HEADER = "x-park-reason"
# On a callback event's broker copy: the event went onto the express lane too
# (job_records.store.ExpressOffer), so the dispatcher asks the lane before sending it.
EXPRESS_HEADER = "x-express"
# The submitting tenant's name and its fair-share weight (absent: 1), read by a worker's
# inbox before it decodes the body; every copy of the job keeps them.
TENANT_HEADER = "x-tenant"
TENANT_WEIGHT_HEADER = "x-tenant-weight"
MAX_TENANT_WEIGHT = 1000.0
# The AMQP type of a callbacks-queue message carrying a CallbackBatch; any other type
# (job.succeeded, ...) is one CallbackDelivery.
CALLBACK_BATCH_TYPE = "inferq.callback-batch"

EventType = Literal["job.succeeded", "job.failed", "job.expired", "job.canceled"]
JobStatus = Literal["succeeded", "failed", "expired", "canceled"]


class UndecodableMessage(ValueError):
    """A queue body that is not a job or callback this version understands (permanent)."""


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted job, as it travels through the model's queue."""

    schema_version: int = SCHEMA_VERSION
    id: str
    model: str
    input: Any
    # None: the caller polls or waits on the job's record instead.
    callback_url: str | None = None
    priority: Priority = "normal"
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    submitted_at_ms: int
    # Wall-clock ms after which the job must not run (from the optional `ttl_s`).
    deadline_ms: int | None = None
    # Who may read and cancel the job: a digest of the submitting API key ("" with auth off).
    owner: str = ""
    # The submitting tenant's name (tenants.registry), for per-tenant metrics; never its key.
    tenant: str = ""
    # An upload (object_store) the worker reads as the input, instead of `input`.
    input_ref: str | None = None
    # A URL the worker fetches the input from (through the callback-URL guard), instead.
    input_url: str | None = None
    input_format: InputFormat = "json"


class JobTimings(msgspec.Struct, frozen=True, kw_only=True):
    queued_ms: float
    inference_ms: float
    batch_size: int


class OutputRef(msgspec.Struct, frozen=True, kw_only=True):
    """An output too large to travel inline (OUTPUT_INLINE_MAX_BYTES), stored in the
    object store: a presigned GET that expires with the job's record, its size and digest."""

    url: str
    size: int
    sha256: str


class EventData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: str
    model: str
    status: JobStatus
    attempts: int
    metadata: dict[str, Any]
    timings: JobTimings
    output: Any = None
    error: str | None = None
    # Instead of `output` when it was stored by reference (OutputRef's fields).
    output_url: str | None = None
    output_size: int | None = None
    output_sha256: str | None = None


class CallbackEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The Standard Webhooks payload a caller receives."""

    type: EventType
    timestamp: str
    data: EventData


class CallbackDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A finished job's event plus where to send it; durable on the callbacks queue.

    Without a `callback_url` the event is only for the job's record: the worker sends
    one only when it could not write the record itself, and the dispatcher writes it."""

    schema_version: int = SCHEMA_VERSION
    webhook_id: str
    callback_url: str | None
    event: CallbackEvent
    # The job itself when there is no callback URL: what the dispatcher records.
    job: Job | None = None


class CallbackBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Several finished jobs' events for one callback host, as one callbacks-queue message."""

    schema_version: int = SCHEMA_VERSION
    deliveries: list[CallbackDelivery]


def _payloads_as_bytes(struct: type[Any], replaced: dict[str, Any]) -> type[Any]:
    """`struct` again with some fields' types replaced, for decoding only: the fields, their
    defaults and the struct's options stay as declared, so it cannot drift from `struct`."""
    config = struct.__struct_config__
    fields: list[tuple[Any, ...]] = []
    for info in msgspec.structs.fields(struct):
        kind = replaced.get(info.name, info.type)
        if info.default is not msgspec.NODEFAULT:
            fields.append((info.name, kind, info.default))
        elif info.default_factory is not msgspec.NODEFAULT:
            fields.append((info.name, kind, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((info.name, kind))
    return msgspec.defstruct(
        f"{struct.__name__}PayloadsAsBytes",
        fields,
        kw_only=True,
        frozen=config.frozen,
        omit_defaults=config.omit_defaults,
    )


_BytesJob = _payloads_as_bytes(Job, {"input": msgspec.Raw})
_BytesEvent = _payloads_as_bytes(
    CallbackEvent, {"data": _payloads_as_bytes(EventData, {"output": msgspec.Raw})}
)
_BytesDelivery = _payloads_as_bytes(CallbackDelivery, {"event": _BytesEvent, "job": _BytesJob | None})
_BytesBatch = _payloads_as_bytes(CallbackBatch, {"deliveries": list[_BytesDelivery]})  # type: ignore[valid-type]

_Body = TypeVar("_Body", Job, CallbackDelivery, CallbackBatch)


def webhook_id_for(job_id: str, event_type: EventType) -> str:
    """Stable per (job, event), so every retry and duplicate of one event shares it."""
    return f"msg_{job_id}_{event_type.removeprefix('job.')}"


def encode(value: Job | CallbackDelivery) -> bytes:
    return msgspec.json.encode(value)


def decode_job(body: bytes) -> Job:
    return _decode(body, Job)


def decode_callback_delivery(body: bytes) -> CallbackDelivery:
    return _decode(body, CallbackDelivery)


def decode_callback_deliveries(
    body: bytes, message_type: str | None, payloads_as_bytes: bool = False
) -> list[CallbackDelivery]:
    """The events a callbacks-queue message carries: a batch's, or the one it is.

    With `payloads_as_bytes` each event's `output` and a carried job's `input` stay the
    JSON they arrived as (`msgspec.Raw`, encoded again verbatim): the dispatcher only
    forwards them, and a 1 MiB output decoded into objects costs it 10 MB or more."""
    # The byte-payload types have the same fields: decoded, they are used as the declared ones.
    delivery = cast(type[CallbackDelivery], _BytesDelivery) if payloads_as_bytes else CallbackDelivery
    batch = cast(type[CallbackBatch], _BytesBatch) if payloads_as_bytes else CallbackBatch
    if message_type == CALLBACK_BATCH_TYPE:
        return _decode(body, batch).deliveries
    return [_decode(body, delivery)]


def callback_batch_body(delivery_bodies: Sequence[bytes]) -> bytes:
    """A CallbackBatch's body from encoded CallbackDelivery bodies, without decoding them."""
    return b'{"schema_version":%d,"deliveries":[%s]}' % (SCHEMA_VERSION, b",".join(delivery_bodies))


def _decode(body: bytes, kind: type[_Body]) -> _Body:
    try:
        value = msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise UndecodableMessage(f"not a valid {kind.__name__} body: {exc}") from exc
    if value.schema_version != SCHEMA_VERSION:
        raise UndecodableMessage(
            f"{kind.__name__} schema_version {value.schema_version} is not supported "
            f"(expected {SCHEMA_VERSION})"
        )
    return value
