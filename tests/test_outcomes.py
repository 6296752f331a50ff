"""What each outcome publishes, built without a broker (outcomes.py is pure)."""

from __future__ import annotations

import json

import msgspec
import pytest

from broker.client import redact_url
from ray_workers.outcomes import parked, retry_for
from wire.callback_events import callback_for, carrying_job
from wire.envelope import (
    AMQP_PRIORITY,
    ATTEMPT_HEADER,
    HISTORY_HEADER,
    PARK_REASON_HEADER,
    Job,
    JobTimings,
    decode_callback_deliveries,
    decode_callback_delivery,
    encode,
)
from wire.retry_tiers import RetrySchedule
from wire.topology import Topology

TOPOLOGY = Topology(prefix="t-", job_retries=RetrySchedule((5.0, 30.0)))
JOB = Job(
    id="job-1",
    model="echo",
    input="hi",
    callback_url="https://example.com/hook",
    priority="high",
    metadata={"k": "v"},
    submitted_at_ms=1_000,
)
TIMINGS = JobTimings(queued_ms=2.0, inference_ms=3.0, batch_size=4)
NOW_S = 1_764_417_600.0


def test_given_a_success_then_one_callback_to_the_callbacks_queue_with_a_stable_webhook_id() -> None:
    publish = callback_for(JOB, "succeeded", 2, TIMINGS, NOW_S, TOPOLOGY, output={"echo": "hi"})

    delivery = decode_callback_delivery(publish.message.body)
    assert (publish.routing_key, publish.exchange) == (TOPOLOGY.callbacks_queue, "t-job-outcomes.echo")
    assert publish.message.message_id == delivery.webhook_id == "msg_job-1_succeeded"
    assert publish.message.correlation_id == "job-1"
    assert publish.message.headers == {ATTEMPT_HEADER: 1}  # the callback's own first attempt
    assert delivery.callback_url == JOB.callback_url
    event = delivery.event
    assert (event.type, event.data.status, event.data.attempts) == ("job.succeeded", "succeeded", 2)
    assert (event.data.output, event.data.error, event.data.metadata) == ({"echo": "hi"}, None, {"k": "v"})
    assert event.timestamp.startswith("2025-11-29T12:00:00")


def test_given_an_expired_job_then_its_callback_says_expired_with_the_reason() -> None:
    publish = callback_for(JOB, "expired", 1, TIMINGS, NOW_S, TOPOLOGY, error="deadline passed")

    event = decode_callback_delivery(publish.message.body).event
    assert (event.type, event.data.error, event.data.output) == ("job.expired", "deadline passed", None)
    assert publish.message.message_id == "msg_job-1_expired"


def test_given_a_transient_failure_then_the_same_body_goes_to_its_tier_with_the_attempt_and_history() -> None:
    body = encode(JOB)
    earlier = json.dumps([{"attempt": 1, "error": "first", "at_ms": 10}])
    publish = retry_for(
        body,
        JOB,
        {ATTEMPT_HEADER: 2, HISTORY_HEADER: earlier, "x-other": "kept"},
        2,
        "boom",
        30.0,
        29_000,
        TOPOLOGY,
        20,
    )

    message = publish.message
    assert publish.routing_key == TOPOLOGY.job_retry_queue("echo", 30.0, "high")
    assert publish.exchange == TOPOLOGY.job_outcomes_exchange("echo")
    assert message.body is body
    assert (message.message_id, message.priority, message.type) == ("job-1", AMQP_PRIORITY["high"], "job")
    assert message.expiration_ms == 29_000
    headers = dict(message.headers or {})
    assert headers[ATTEMPT_HEADER] == 3 and headers["x-other"] == "kept"
    assert json.loads(headers[HISTORY_HEADER]) == [
        {"attempt": 1, "error": "first", "at_ms": 10},
        {"attempt": 2, "error": "boom", "at_ms": 20},
    ]


def test_given_a_permanent_failure_then_the_job_is_parked_with_reason_and_history() -> None:
    publish = parked(
        encode(JOB),
        "job-1",
        {ATTEMPT_HEADER: 3},
        "failed after 3 attempt(s)",
        "echo",
        TOPOLOGY,
        3,
        "x" * 900,
        30,
    )

    headers = dict(publish.message.headers or {})
    assert (publish.routing_key, publish.exchange) == ("t-jobs.echo.parked", "t-job-outcomes.echo")
    assert headers[PARK_REASON_HEADER] == "failed after 3 attempt(s)"
    (entry,) = json.loads(headers[HISTORY_HEADER])
    assert entry == {"attempt": 3, "error": "x" * 500, "at_ms": 30}  # errors are capped


def test_given_an_undecodable_body_then_it_is_parked_as_is_without_history() -> None:
    publish = parked(b"\x00junk", "unknown", {}, "not JSON: " + "y" * 2000, "echo", TOPOLOGY)

    headers = dict(publish.message.headers or {})
    assert publish.message.body == b"\x00junk"
    assert HISTORY_HEADER not in headers
    assert len(headers[PARK_REASON_HEADER]) == 1000


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:s3cret@rabbit:5672/%2F", "amqp://guest:***@rabbit:5672/%2F"),
        ("amqps://user:p%40ss@host/vh", "amqps://user:***@host/vh"),
        ("amqp://rabbit:5672/", "amqp://rabbit:5672/"),
        # Review item 19: a comma in a password split it between two "URLs", both kept whole.
        ("amqp://u:pa,ss@h1:5701/%2F", "amqp://u:***@h1:5701/%2F"),
        ("amqp://u:a,b@h1/,amqp://u:c,d@h2/", "amqp://u:***@h1/,amqp://u:***@h2/"),
        ("amqp://u:x@h1/,amqp://h2/", "amqp://u:***@h1/,amqp://h2/"),
    ],
)
def test_an_amqp_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_dispatcher_s_decoding_keeps_outputs_and_inputs_as_the_bytes_they_arrived_as() -> None:
    """Budgets issue: the dispatcher only forwards an event's output (and a carried job's
    input); decoded into objects, a 1 MiB output cost it 10 MB or more."""
    job = Job(id="j", model="echo", input={"k": [1, 2]}, callback_url="http://h/", submitted_at_ms=0)
    timings = JobTimings(queued_ms=1.0, inference_ms=2.0, batch_size=1)
    output = {"nested": [{"a": 1.5}, "text"]}
    event = carrying_job(callback_for(job, "succeeded", 1, timings, 0.0, TOPOLOGY, output=output), job)

    [as_objects] = decode_callback_deliveries(event.message.body, event.message.type)
    [as_bytes] = decode_callback_deliveries(event.message.body, event.message.type, payloads_as_bytes=True)

    assert as_objects.event.data.output == output
    assert isinstance(as_bytes.event.data.output, msgspec.Raw)
    assert as_bytes.job is not None and isinstance(as_bytes.job.input, msgspec.Raw)
    assert msgspec.json.encode(as_bytes) == event.message.body  # forwarded verbatim
    assert msgspec.json.encode(as_bytes.event) == msgspec.json.encode(as_objects.event)
