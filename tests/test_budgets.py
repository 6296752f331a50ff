"""Byte and CPU budgets at the edge (budgets issue): each hostile body is answered with a
problem naming its limit, fast, before anything is decoded in full, written or queued.
Against the ASGI app and the real broker and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.budgets import nested, texts_of_zeros
from ingress.inflight_bytes import InflightBytes, InflightFull
from ingress.json_budget import JsonBudget
from ingress.settings import IngressSettings
from model_catalogue.catalogue import Catalogue, ModelEntry
from model_catalogue.input_schemas import InputSchemas, ValidationBudgetExceeded
from tests.conftest import TEST_MODELS, drain_queue, queue_holds, running_ingress, wait_until

MIB = 1024 * 1024
JSON = {"content-type": "application/json"}


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["type"] == f"https://inferq.dev/problems/{slug}"
    return body


@pytest.fixture
def minilm_settings(ingress_settings: IngressSettings) -> IngressSettings:
    return replace(ingress_settings, models=(*TEST_MODELS, "embed-minilm"))


async def _slowest_health_check(client: httpx.AsyncClient, done: asyncio.Event) -> float:
    worst_s = 0.0
    while not done.is_set():
        started = time.monotonic()
        assert (await client.get("/healthz")).status_code == 200
        worst_s = max(worst_s, time.monotonic() - started)
        await asyncio.sleep(0.01)
    return worst_s


async def test_given_a_1_mib_schema_miss_on_every_item_then_a_413_naming_the_values_limit_at_once(
    minilm_settings: IngressSettings,
) -> None:
    """Half a million values: refused on the bytes (was 422 after 10-16 s and 1.8 GB)."""
    async with running_ingress(minilm_settings) as client:
        started = time.monotonic()
        response = await client.post(
            "/v1/models/embed-minilm/jobs", content=texts_of_zeros(MIB), headers=JSON
        )
        elapsed_s = time.monotonic() - started

    body = _problem(response, 413, "too-many-json-values")
    assert body["limit"] == "MAX_JSON_VALUES"
    assert elapsed_s < 1.0


async def test_given_a_schema_miss_within_the_values_budget_then_422_at_its_first_item_and_health_answers(
    minilm_settings: IngressSettings,
) -> None:
    """The values budget raised past the body: the schema check stops at the first bad item
    (one error per oneOf branch, not one per item) and runs off the event loop."""
    settings = replace(minilm_settings, json_budget=JsonBudget(max_values=1_000_000))
    async with running_ingress(settings) as client:
        done = asyncio.Event()
        health = asyncio.create_task(_slowest_health_check(client, done))
        started = time.monotonic()
        response = await client.post(
            "/v1/models/embed-minilm/jobs", content=texts_of_zeros(MIB), headers=JSON
        )
        elapsed_s = time.monotonic() - started
        done.set()
        worst_health_s = await health

    body = _problem(response, 422, "invalid-input")
    errors = body["errors"]
    assert isinstance(errors, list) and len(errors) == 1
    assert errors[0]["pointer"] == "/input/texts"
    assert errors[0]["detail"].endswith("is too long")
    assert len(str(body["detail"])) < 500
    assert elapsed_s < 1.0
    assert worst_health_s < 0.5


@pytest.mark.parametrize(("depth", "status"), [(64, 202), (65, 422), (973, 422), (5000, 422)])
async def test_given_nested_json_then_within_the_depth_budget_202_else_422_and_nothing_queued(
    client: httpx.AsyncClient, ingress_settings: IngressSettings, depth: int, status: int
) -> None:
    """973 levels answered 500 and left a `queued` record for 24 h: the job was re-encoded
    deeper than it was decoded, after its record was written."""
    response = await client.post("/v1/models/echo/jobs", content=nested(depth), headers=JSON)

    assert response.status_code == status, response.text
    queue = ingress_settings.topology.main_queue("echo")
    if status == 202:
        await wait_until(lambda: queue_holds(ingress_settings.amqp_url, queue, 1), 5, "the job queued")
    else:
        assert _problem(response, 422, "json-too-deep")["limit"] == "MAX_JSON_DEPTH"
        assert await drain_queue(ingress_settings.amqp_url, queue) == []


@pytest.mark.parametrize("value", ["²", "٣", "1²", "0"])
async def test_given_a_wait_preference_that_is_not_ascii_digits_then_it_is_ignored_or_capped_never_500(
    client: httpx.AsyncClient, value: str
) -> None:
    response = await client.post(
        "/v1/models/echo/jobs",
        json={"input": 1, "callback_url": "http://127.0.0.1:9/"},
        headers={b"prefer": f"wait={value}".encode()},
    )

    assert response.status_code in (200, 202), response.text


async def test_given_a_content_length_that_is_not_ascii_digits_then_400(client: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"input": 1}'

    for declared in ("²", "1" * 5000):
        response = await client.post(
            "/v1/models/echo/jobs",
            content=body(),
            headers={b"content-type": b"application/json", b"content-length": declared.encode()},
        )
        assert response.status_code in (400, 413), response.text


async def test_given_a_tiny_validation_budget_then_422_naming_it(ingress_settings: IngressSettings) -> None:
    settings = replace(ingress_settings, input_validation_budget_ms=1e-9)
    async with running_ingress(settings) as client:
        response = await client.post("/v1/models/synthetic/jobs", json={"input": {"sleep_ms": 1}})

    assert _problem(response, 422, "input-too-complex")["limit"] == "INPUT_VALIDATION_BUDGET_MS"


def test_given_a_schema_whose_cost_grows_with_the_input_then_the_check_ends_at_its_budget() -> None:
    schema = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}]}}
    catalogue = Catalogue("test", {"m": ModelEntry("m", "x:Y", "", schema)})
    schemas = InputSchemas(catalogue, ("m",), budget_s=0.02)

    started = time.monotonic()
    with pytest.raises(ValidationBudgetExceeded):
        schemas.problem("m", [1.5] * 1_000_000)
    assert time.monotonic() - started < 0.5
    assert schemas.problem("m", [1.5, "a"]) is None
    assert schemas.problem("m", [None]) == ("/input/0", "not valid under any of the 2 schemas of anyOf")


async def test_given_no_room_for_waiters_then_the_job_is_accepted_without_waiting(
    ingress_settings: IngressSettings,
) -> None:
    """MAX_WAITERS bounds the requests held open; past it the preference is not applied."""
    settings = replace(ingress_settings, max_waiters=0)
    async with running_ingress(settings) as client:
        started = time.monotonic()
        response = await client.post("/v1/models/echo/jobs", json={"input": 1}, headers={"Prefer": "wait=30"})

    assert response.status_code == 202, response.text
    assert "preference-applied" not in response.headers
    assert time.monotonic() - started < 5


async def test_given_bodies_in_flight_past_the_byte_budget_then_503_with_retry_after_and_nothing_queued(
    ingress_settings: IngressSettings,
) -> None:
    """A body still arriving holds its declared length; the next one over the budget is
    refused at once instead of being buffered and decoded beside it."""
    settings = replace(ingress_settings, max_body_bytes=4096, max_inflight_body_bytes=5000)
    release = asyncio.Event()
    first_half = b'{"input": "' + b"x" * 1000
    second_half = b'"}'

    async def slow_body() -> AsyncIterator[bytes]:
        yield first_half
        await release.wait()
        yield second_half

    length = str(len(first_half) + len(second_half))
    async with running_ingress(settings) as client:
        slow = asyncio.create_task(
            client.post(
                "/v1/models/echo/jobs", content=slow_body(), headers={**JSON, "content-length": length}
            )
        )
        state = client._transport.app.state.ingress  # type: ignore[attr-defined]
        await wait_until(lambda: state.inflight.used > 0, 5, "the slow body's reservation")
        refused = await client.post(
            "/v1/models/echo/jobs", content=b'{"input": "' + b"y" * 4000 + b'"}', headers=JSON
        )
        release.set()
        accepted = await slow

    _problem(refused, 503, "ingress-busy")
    assert refused.headers["retry-after"]
    assert accepted.status_code == 202, accepted.text
    assert state.inflight.used == 0
    queued = await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo"))
    assert len(queued) == 1


@pytest.mark.parametrize(
    ("used", "size", "fits"), [(0, 10_000, True), (100, 900, True), (100, 901, False), (1000, 1, False)]
)
def test_in_flight_bytes_fit_the_budget_and_a_lone_body_always_fits(used: int, size: int, fits: bool) -> None:
    budget = InflightBytes(max_bytes=1000, used=used)
    if fits:
        reservation = budget.reserve(size)
        reservation.release()
        reservation.release()
        assert budget.used == used
    else:
        with pytest.raises(InflightFull, match="MAX_INFLIGHT_BODY_BYTES"):
            budget.reserve(size)


async def test_given_metadata_over_its_budget_then_413_naming_it_and_nothing_queued(
    client: httpx.AsyncClient, ingress_settings: IngressSettings
) -> None:
    """Metadata is kept in the record for RESULT_TTL_S: up to the body limit, 1,000 jobs of
    1 MiB metadata filled Redis."""
    body = {"input": 1, "callback_url": "http://127.0.0.1:9/", "metadata": {"m": "x" * 70_000}}
    response = await client.post("/v1/models/echo/jobs", json=body)

    assert _problem(response, 413, "metadata-too-large")["limit"] == "MAX_METADATA_BYTES"
    assert await drain_queue(ingress_settings.amqp_url, ingress_settings.topology.main_queue("echo")) == []


body_shapes = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(0, 3000)).map(
        lambda dw: b"[" * dw[0] + b"0," * dw[1] + b"0" + b"]" * dw[0]
    ),
    st.integers(0, 5000).map(lambda w: b"{" + b",".join(b'"k%d":{}' % i for i in range(w)) + b"}"),
    st.integers(1, 200).map(lambda d: b'{"a":' * d + b'"\\u00e9[\\"]"' + b"}" * d),
    st.recursive(
        st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=8), children, max_size=8)
        ),
        max_leaves=60,
    ).map(lambda value: json.dumps(value).encode()),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    shape=body_shapes,
    model=st.sampled_from(["echo", "synthetic"]),
    prefer=st.text(max_size=12),
    key=st.text(min_size=1, max_size=12),
)
async def test_any_body_shape_and_header_text_is_answered_below_500_and_in_bounded_time(
    client: httpx.AsyncClient, shape: bytes, model: str, prefer: str, key: str
) -> None:
    """Depth, width, value count and unicode in headers: never a 5xx, never slow."""
    body = b'{"input": ' + shape + b', "callback_url": "http://127.0.0.1:9/"}'
    headers = {
        b"content-type": b"application/json",
        b"prefer": b"wait=0, " + prefer.encode(),
        b"idempotency-key": key.encode(),
    }
    started = time.monotonic()
    response = await client.post(f"/v1/models/{model}/jobs", content=body, headers=headers)

    assert response.status_code < 500, response.text
    assert time.monotonic() - started < 2.0
