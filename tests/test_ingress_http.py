"""The HTTP contract of the ingress, against the ASGI app and the real broker."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from broker.client import Broker, Delivery
from ingress.settings import IngressSettings
from tests.conftest import drain_queue, running_ingress, wait_until
from wire.envelope import ATTEMPT_HEADER, DEADLINE_HEADER, decode_job

CALLBACK = "http://127.0.0.1:9/callbacks"


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    return body


async def test_given_a_valid_job_when_submitted_then_202_and_the_job_is_on_the_model_queue(
    client: httpx.AsyncClient, ingress_settings: IngressSettings
) -> None:
    response = await client.post(
        "/v1/models/echo/jobs",
        json={"input": {"x": 1}, "callback_url": CALLBACK, "priority": "high", "metadata": {"k": "v"}},
    )

    assert response.status_code == 202
    accepted = response.json()
    assert accepted["model"] == "echo" and accepted["status"] == "queued"
    assert accepted["priority"] == "high"
    high_queue = ingress_settings.topology.job_queue("echo", "high")  # counted apart for scaling
    messages = await drain_queue(ingress_settings.amqp_url, high_queue)
    assert len(messages) == 1
    message = messages[0]
    job = decode_job(message.body)
    assert (job.id, job.input, job.metadata) == (accepted["id"], {"x": 1}, {"k": "v"})
    assert message.message_id == job.id and message.correlation_id == job.id
    assert message.priority == 2 and message.delivery_mode == 2
    assert message.content_type == "application/json" and message.timestamp is not None
    assert message.headers[ATTEMPT_HEADER] == 1
    assert DEADLINE_HEADER not in message.headers


async def test_given_a_ttl_then_the_deadline_travels_in_the_body_and_a_header(
    client: httpx.AsyncClient, ingress_settings: IngressSettings
) -> None:
    before_ms = int(time.time() * 1000)
    response = await client.post(
        "/v1/models/echo/jobs", json={"input": 1, "callback_url": CALLBACK, "ttl_s": 30}
    )
    assert response.status_code == 202
    (message,) = await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo"))
    job = decode_job(message.body)
    assert job.deadline_ms is not None and before_ms + 30_000 <= job.deadline_ms <= before_ms + 31_000
    assert message.headers[DEADLINE_HEADER] == job.deadline_ms


async def test_given_a_model_with_a_default_ttl_then_a_job_without_one_gets_it_and_ttl_s_still_wins(
    ingress_settings: IngressSettings, tmp_path: Path
) -> None:
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(
        "models:\n  echo:\n    class: ray_workers.models.echo:EchoModel\n    jobs: {default_ttl_s: 20}\n"
    )
    settings = replace(ingress_settings, models=("echo",), model_catalogue=str(catalogue))
    before_ms = int(time.time() * 1000)
    async with running_ingress(settings) as client:
        for ttl in ({}, {"ttl_s": 30}):
            response = await client.post(
                "/v1/models/echo/jobs", json={"input": 1, "callback_url": CALLBACK, **ttl}
            )
            assert response.status_code == 202, response.text
    defaulted, explicit = await drain_queue(settings.amqp_url, settings.topology.main_queue("echo"))

    assert before_ms + 20_000 <= defaulted.headers[DEADLINE_HEADER] <= before_ms + 21_000  # type: ignore[operator]
    assert before_ms + 30_000 <= explicit.headers[DEADLINE_HEADER] <= before_ms + 31_000  # type: ignore[operator]


@pytest.mark.parametrize("ttl", [0, -1, "soon", 10**9])
async def test_given_an_invalid_ttl_then_422(client: httpx.AsyncClient, ttl: object) -> None:
    response = await client.post(
        "/v1/models/echo/jobs", json={"input": 1, "callback_url": CALLBACK, "ttl_s": ttl}
    )
    assert "ttl_s" in str(_problem(response, 422)["detail"])


@pytest.mark.parametrize(
    ("body", "content_type", "status", "slug"),
    [
        (b"{not json", "application/json", 400, "malformed-json"),
        (b'{"callback_url": "http://127.0.0.1:9/"}', "application/json", 422, "validation-error"),
        (
            b'{"input": 1, "callback_url": "http://127.0.0.1:9/", "priority": "urgent"}',
            "application/json",
            422,
            "validation-error",
        ),
        (
            b'{"input": 1, "callback_url": "http://127.0.0.1:9/", "extra": true}',
            "application/json",
            422,
            "validation-error",
        ),
        (
            b'{"input": 1, "callback_url": "ftp://127.0.0.1/"}',
            "application/json",
            422,
            "invalid-callback-url",
        ),
        (
            b'{"input": 1, "callback_url": "http://user:pw@127.0.0.1/"}',
            "application/json",
            422,
            "invalid-callback-url",
        ),
        (
            b'{"input": 1, "callback_url": "http://127.0.0.2:9/"}',
            "application/json",
            422,
            "invalid-callback-url",
        ),
        (b'{"input": 1, "callback_url": "http://[::1]:9/"}', "application/json", 422, "invalid-callback-url"),
        (b'{"input": 1, "callback_url": "http://127.0.0.1:9/"}', "text/plain", 415, "unsupported-media-type"),
        # Hardening: a URL the callback client could not send (item 5), a malformed name (13).
        (
            b'{"input": 1, "callback_url": "http://93.184.216.34/\\u0001"}',
            "application/json",
            422,
            "invalid-callback-url",
        ),
        (b'{"input": 1, "callback_url": "http://a..com/"}', "application/json", 422, "invalid-callback-url"),
        # Item 15: JSON nested beyond the depth budget (MAX_JSON_DEPTH) is refused, not a 500.
        (
            b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b', "callback_url": "http://127.0.0.1:9/"}',
            "application/json",
            422,
            "json-too-deep",
        ),
    ],
)
async def test_given_a_bad_request_when_submitted_then_a_problem_and_nothing_published(
    client: httpx.AsyncClient,
    ingress_settings: IngressSettings,
    body: bytes,
    content_type: str,
    status: int,
    slug: str,
) -> None:
    response = await client.post("/v1/models/echo/jobs", content=body, headers={"content-type": content_type})

    problem = _problem(response, status)
    assert str(problem["type"]).endswith(slug)
    assert await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo")) == []


async def test_given_an_unknown_model_when_submitted_then_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/gpt-9/jobs", json={"input": 1, "callback_url": CALLBACK})
    assert "gpt-9" in str(_problem(response, 404)["detail"])


async def test_given_a_body_over_the_limit_when_sent_with_or_without_length_then_413(
    ingress_settings: IngressSettings,
) -> None:
    settings = replace(ingress_settings, max_body_bytes=64)
    big = msgspec.json.encode({"input": "x" * 200, "callback_url": CALLBACK})

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 16):
            yield big[start : start + 16]

    async with running_ingress(settings) as client:
        with_length = await client.post(
            "/v1/models/echo/jobs", content=big, headers={"content-type": "application/json"}
        )
        without_length = await client.post(
            "/v1/models/echo/jobs", content=chunked(), headers={"content-type": "application/json"}
        )

    _problem(with_length, 413)
    _problem(without_length, 413)
    assert "content-length" not in {k.lower() for k in without_length.request.headers}
    assert await drain_queue(settings.amqp_url, settings.topology.main_queue("echo")) == []


async def test_given_api_keys_when_the_key_is_missing_or_wrong_then_401_else_202(
    ingress_settings: IngressSettings,
) -> None:
    settings = replace(ingress_settings, api_keys=("k-one", "k-two"))
    job = {"input": 1, "callback_url": CALLBACK}
    async with running_ingress(settings) as client:
        missing = await client.post("/v1/models/echo/jobs", json=job)
        wrong = await client.post(
            "/v1/models/echo/jobs", json=job, headers={"authorization": "Bearer k-three"}
        )
        right = await client.post("/v1/models/echo/jobs", json=job, headers={"authorization": "Bearer k-two"})

    _problem(missing, 401)
    _problem(wrong, 401)
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert right.status_code == 202


async def test_given_the_broker_is_unreachable_then_not_ready_and_jobs_get_503_with_retry_after(
    ingress_settings: IngressSettings,
) -> None:
    settings = replace(ingress_settings, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    async with running_ingress(settings, wait_ready=False) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        submitted = await client.post("/v1/models/echo/jobs", json={"input": 1, "callback_url": CALLBACK})

    assert health.status_code == 200
    _problem(ready, 503)
    _problem(submitted, 503)
    assert submitted.headers["retry-after"].isdigit()


async def test_given_a_running_ingress_then_models_ready_metrics_and_openapi_are_served(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/v1/models/echo/jobs", json={"input": 1, "callback_url": CALLBACK})
    await client.post("/v1/models/echo/jobs", content=b"{", headers={"content-type": "application/json"})

    models = await client.get("/v1/models")
    ready = await client.get("/readyz")
    metrics = await client.get("/metrics")
    spec = await client.get("/openapi.json")
    missing = await client.get("/nope")

    assert [m["name"] for m in models.json()["models"]] == ["echo", "synthetic"]
    assert ready.status_code == 200
    assert 'inferq_ingress_jobs_accepted_total{model="echo",priority="normal"} 1.0' in metrics.text
    assert 'inferq_ingress_requests_rejected_total{status="400"} 1.0' in metrics.text
    assert "/v1/models/{model}/jobs" in spec.json()["paths"]
    _problem(missing, 404)


async def test_given_a_full_queue_then_503_and_no_202(
    ingress_settings: IngressSettings,
) -> None:
    settings = replace(ingress_settings, topology=replace(ingress_settings.topology, max_queue_length=1))
    job = {"input": 1, "callback_url": CALLBACK}
    async with running_ingress(settings) as client:
        first = await client.post("/v1/models/echo/jobs", json=job)
        second = await client.post("/v1/models/echo/jobs", json=job)

    assert first.status_code == 202
    problem = _problem(second, 503)
    assert str(problem["type"]).endswith("queue-full") and "MAX_QUEUE_LENGTH=1" in str(problem["detail"])
    assert second.headers["retry-after"].isdigit()
    queued = await drain_queue(settings.amqp_url, settings.topology.main_queue("echo"))
    assert [decode_job(m.body).id for m in queued] == [first.json()["id"]]


async def test_given_a_temporary_dns_failure_then_503_with_retry_after_not_422(
    client: httpx.AsyncClient, ingress_settings: IngressSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening item 12: 'try again' from DNS is not a verdict on the URL."""
    real_getaddrinfo = socket.getaddrinfo

    def flaky(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.flaky.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", flaky)
    response = await client.post(
        "/v1/models/echo/jobs", json={"input": 1, "callback_url": "https://hooks.flaky.example/cb"}
    )

    problem = _problem(response, 503)
    assert str(problem["type"]).endswith("dns-unavailable")
    assert response.headers["retry-after"].isdigit()
    assert await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo")) == []


async def test_given_a_burst_of_jobs_then_demand_is_announced_coalesced_off_the_202_path(
    client: httpx.AsyncClient, ingress_settings: IngressSettings
) -> None:
    """Push activation's source: accepted jobs announce `model.echo.demand`, a few per second at
    most, however many jobs arrive."""
    listener = Broker(ingress_settings.amqp_url, ingress_settings.topology, ("echo",), role="listener")
    await listener.connect()
    heard: list[str] = []

    async def on_event(delivery: Delivery) -> None:
        heard.append(delivery.body.decode())
        await delivery.ack()

    try:
        await listener.subscribe(ingress_settings.topology.demand_queue, "model.*.demand", on_event)
        started = time.monotonic()
        for n in range(40):
            response = await client.post("/v1/models/echo/jobs", json={"input": n, "callback_url": CALLBACK})
            assert response.status_code == 202
        elapsed_s = time.monotonic() - started
        await wait_until(lambda: len(heard) >= 1, 5, "a demand event")
    finally:
        await listener.close()

    assert set(heard) == {"echo"}
    assert len(heard) <= elapsed_s / 0.25 + 1  # coalesced: one per 0.25 s at most, not one per job
