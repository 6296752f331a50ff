"""Inputs by reference, end to end on a real S3-compatible server (moto's) and the real
broker: POST /v1/uploads presigns a PUT, the client sends the bytes straight to the
store, a job names the upload as `input_ref`, the worker reads it, checks it against the
model's schema, runs it and the signed callback carries the result."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from object_store.store import StoreSettings
from ray_workers.job_worker import JobWorker
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tenants.registry import Tenant, key_digest
from tests.conftest import queue_holds, running_ingress, running_worker, upload_json, wait_until_tried

# Over MAX_BODY_BYTES (1 MiB): too large to send inline.
LARGE_INPUT = {"rows": [{"n": n, "text": "x" * 100} for n in range(12_000)]}


@pytest.fixture
async def store_workers(
    worker_settings: WorkerSettings, object_store: StoreSettings, dispatcher: CallbackDispatcher
) -> AsyncIterator[None]:
    settings = replace(worker_settings, object_store=object_store)
    started = [JobWorker(EchoModel(), settings), JobWorker(SyntheticModel(), settings)]
    for worker in started:
        await worker.start()
    yield
    for worker in started:
        await worker.stop()


async def _upload(client: httpx.AsyncClient, value: Any) -> str:
    upload = await upload_json(client, value)
    assert upload["expires_at"] and upload["max_bytes"] == 1024**3
    ref: str = upload["input_ref"]
    return ref


async def test_given_an_upload_larger_than_a_request_may_be_then_a_job_naming_it_runs_on_it(
    store_client: httpx.AsyncClient, receiver: CallbackReceiver, store_workers: None
) -> None:
    """And its output, over OUTPUT_INLINE_MAX_BYTES, comes back by reference: in the
    callback and the record, a presigned URL, its size and digest, instead of the bytes."""
    ref = await _upload(store_client, LARGE_INPUT)
    inline = await store_client.post("/v1/models/echo/jobs", json={"input": LARGE_INPUT})

    submitted = await store_client.post(
        "/v1/models/echo/jobs", json={"input_ref": ref, "callback_url": receiver.url}
    )

    assert inline.status_code == 413, "the same input inline is over MAX_BODY_BYTES"
    assert submitted.status_code == 202, submitted.text
    (received,) = await receiver.wait_for(1, timeout_s=30)
    data = received.event["data"]
    assert received.verified and received.event["type"] == "job.succeeded"
    assert data["id"] == submitted.json()["id"] and "output" not in data
    async with httpx.AsyncClient() as direct:
        download = await direct.get(data["output_url"])
    assert download.status_code == 200 and json.loads(download.content) == LARGE_INPUT
    assert data["output_size"] == len(download.content) > 256 * 1024
    assert data["output_sha256"] == hashlib.sha256(download.content).hexdigest()
    record = (await store_client.get(f"/v1/jobs/{data['id']}")).json()
    assert (record["output_url"], record["output_sha256"]) == (data["output_url"], data["output_sha256"])
    assert "output" not in record


async def test_given_a_referenced_input_the_schema_refuses_then_the_job_fails_naming_the_field(
    store_client: httpx.AsyncClient, receiver: CallbackReceiver, store_workers: None
) -> None:
    ref = await _upload(store_client, {"sleep_ms": "soon"})

    submitted = await store_client.post(
        "/v1/models/synthetic/jobs", json={"input_ref": ref, "callback_url": receiver.url}
    )

    assert submitted.status_code == 202, "the ingress checks only that the upload exists"
    (received,) = await receiver.wait_for(1, timeout_s=30)
    assert received.event["type"] == "job.failed"
    error = received.event["data"]["error"]
    assert "invalid input" in error and "synthetic's input schema at /input/sleep_ms" in error


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"input_ref": "uploads/someoneelse/" + "0" * 32}, 422, "invalid-input-ref"),
        ({"input_ref": "../../etc/passwd"}, 422, "invalid-input-ref"),
        ({"input_ref": "uploads/anonymous/" + "0" * 32}, 422, "input-ref-not-found"),
        ({"input_ref": "uploads/anonymous/" + "0" * 32, "input": 1}, 422, "validation-error"),
        ({"callback_url": "http://127.0.0.1:9/"}, 422, "validation-error"),
    ],
)
async def test_given_a_reference_that_is_not_an_upload_of_the_callers_then_nothing_is_queued(
    store_client: httpx.AsyncClient,
    broker: Broker,
    amqp_url: str,
    body: dict[str, Any],
    status: int,
    slug: str,
) -> None:
    answer = await store_client.post("/v1/models/echo/jobs", json=body)

    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["type"].endswith(slug)
    assert await queue_holds(amqp_url, broker.topology.job_queues("echo")[0], 0)


async def test_given_the_store_down_then_a_job_naming_an_upload_answers_503_and_is_not_queued(
    with_store: IngressSettings, broker: Broker, amqp_url: str
) -> None:
    assert with_store.object_store is not None
    down = replace(with_store.object_store, endpoint_url="http://127.0.0.1:9")  # nothing listens
    async with running_ingress(replace(with_store, object_store=down)) as client:
        ref = "uploads/anonymous/" + "1" * 32
        answer = await client.post("/v1/models/echo/jobs", json={"input_ref": ref})

    assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
    assert answer.json()["type"].endswith("store-unavailable")
    assert await queue_holds(amqp_url, broker.topology.job_queues("echo")[0], 0)


async def test_given_no_object_store_then_uploads_answer_501_and_a_reference_422_saying_so(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post("/v1/uploads")
    job = await client.post("/v1/models/echo/jobs", json={"input_ref": "uploads/anonymous/" + "2" * 32})

    assert answer.status_code == 501 and "S3_ENDPOINT_URL" in answer.json()["detail"]
    assert job.status_code == 422 and job.json()["type"].endswith("uploads-off")


async def test_given_the_store_down_when_the_worker_reads_then_the_job_retries_and_runs_once_it_is_back(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    object_store: StoreSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    ref = await _upload(store_client, {"n": 7})
    up = replace(worker_settings, object_store=object_store)
    down = replace(up, object_store=replace(object_store, endpoint_url="http://127.0.0.1:9"))

    async with running_worker(EchoModel(), down):
        submitted = await store_client.post(
            "/v1/models/echo/jobs", json={"input_ref": ref, "callback_url": receiver.url}
        )
        what = "the first attempt, on a store that does not answer"
        await wait_until_tried(store_client, submitted.json()["id"], what)
    async with running_worker(EchoModel(), up):
        (received,) = await receiver.wait_for(1, timeout_s=30)

    assert received.event["type"] == "job.succeeded" and received.event["data"]["output"] == {"n": 7}
    assert received.event["data"]["attempts"] == 2, "one retry: the store's outage cost no job"


async def test_given_jobs_naming_large_uploads_then_a_batch_holds_their_bytes_within_its_budget(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    object_store: StoreSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    """Three queued jobs of small messages naming 120 KB uploads, a worker whose batch may
    hold 100 KB: one job per batch (each read whole), not all three read at once (1 GiB
    uploads would be 32 GiB)."""
    refs = [await _upload(store_client, {"n": n, "text": "x" * 120_000}) for n in range(3)]
    for ref in refs:
        answer = await store_client.post(
            "/v1/models/echo/jobs", json={"input_ref": ref, "callback_url": receiver.url}
        )
        assert answer.status_code == 202, answer.text

    settings = replace(worker_settings, object_store=object_store, batch_max_bytes=100_000)
    async with running_worker(EchoModel(), settings):
        received = await receiver.wait_for(3, timeout_s=30)

    assert sorted(r.event["data"]["output"]["n"] for r in received) == [0, 1, 2]
    assert [r.event["data"]["timings"]["batch_size"] for r in received] == [1, 1, 1]


async def test_given_a_rate_limited_tenant_then_uploads_take_tokens_of_their_own_bucket(
    with_store: IngressSettings,
) -> None:
    """Each upload may put UPLOAD_MAX_BYTES in the store: a limited key's uploads have a
    bucket as large as its jobs', and spending it leaves its jobs' untouched."""
    key = "uploads-limited-key"
    limited = Tenant("limited", key_digest(key), rate_per_s=0.5, burst=2)
    settings = replace(with_store, api_keys=("plain-key",), named_tenants=(limited,))
    auth = {"Authorization": f"Bearer {key}"}
    async with running_ingress(settings) as client:
        uploads = [await client.post("/v1/uploads", headers=auth) for _ in range(3)]
        job = await client.post("/v1/models/echo/jobs", json={"input": 1}, headers=auth)

    assert [u.status_code for u in uploads] == [201, 201, 429]
    assert uploads[0].headers["ratelimit-policy"] == '"burst";q=2;w=4'
    refused = uploads[2]
    assert refused.json()["type"].endswith("/rate-limited") and "uploads/s" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert job.status_code == 202, "the jobs' bucket is its own"
