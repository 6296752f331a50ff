"""JSON Lines jobs (`input_format: "jsonl"`), streamed: the worker reads the referenced
input a chunk at a time, runs its records through the model in batches and writes the
output lines to the store a part at a time. End to end on moto's S3 server, the real
broker and a real callback receiver; the memory bound measured with tracemalloc."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from callbacks.dispatcher import CallbackDispatcher
from loadgen.callback_receiver import CallbackReceiver
from object_store.store import PART_BYTES, ObjectStore, StoreSettings
from policies.callback_guard import AllowList
from ray_workers.json_lines import JsonLinesJobs, RecordRefused, split_lines
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.payload_references import PayloadReferences
from ray_workers.settings import WorkerSettings
from tests.conftest import running_worker, serving, upload_bytes, wait_until_tried
from wire.envelope import Job


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _lines(*parts: bytes, max_line_bytes: int = 100) -> list[tuple[int, bytes]]:
    return [numbered async for numbered in split_lines(_chunks(*parts), max_line_bytes)]


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ((b'{"a":1}\n{"a":2}\n',), [(1, b'{"a":1}'), (2, b'{"a":2}')]),
        ((b'{"a"', b":1}\n[2", b"]"), [(1, b'{"a":1}'), (2, b"[2]")]),
        ((b"1\n\n  \n2\r\n",), [(1, b"1"), (4, b"2\r")]),
        ((b"", b"\n", b"3"), [(2, b"3")]),
        ((b"",), []),
        ((b"\xef\xbb\xbf{}\n",), [(1, b"{}")]),
        ((b"\xef", b"\xbb", b"\xbf1\n2"), [(1, b"1"), (2, b"2")]),
    ],
)
async def test_given_chunks_with_any_borders_then_each_non_blank_line_comes_once_with_its_number(
    parts: tuple[bytes, ...], expected: list[tuple[int, bytes]]
) -> None:
    assert await _lines(*parts) == expected


@pytest.mark.parametrize("parts", [(b"1\n" + b"x" * 101 + b"\n",), (b"1\n", b"x" * 60, b"x" * 60)])
async def test_given_a_line_over_the_limit_then_it_is_refused_by_number_before_it_is_held(
    parts: tuple[bytes, ...],
) -> None:
    with pytest.raises(RecordRefused, match="line 2 is longer than 100 bytes"):
        await _lines(*parts)


def _jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


@pytest.fixture
def store_worker_settings(worker_settings: WorkerSettings, object_store: StoreSettings) -> WorkerSettings:
    return replace(worker_settings, object_store=object_store)


async def _download(url: str) -> bytes:
    async with httpx.AsyncClient() as direct:
        answer = await direct.get(url)
    assert answer.status_code == 200, answer.text
    return answer.content


async def test_given_a_jsonl_upload_then_the_output_is_jsonl_line_for_line_by_reference(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    store_worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    """Records in, one output line per record out (blank lines skipped), however small
    the output: a JSON Lines job's output is always the stored file."""
    records = [{"n": n} for n in range(300)] + ["text", [1, 2], None]
    upload = await upload_bytes(store_client, _jsonl(records[:150]) + b"\n" + _jsonl(records[150:]))

    async with running_worker(EchoModel(), store_worker_settings):
        submitted = await store_client.post(
            "/v1/models/echo/jobs",
            json={"input_ref": upload["input_ref"], "input_format": "jsonl", "callback_url": receiver.url},
        )
        assert submitted.status_code == 202, submitted.text
        (received,) = await receiver.wait_for(1, timeout_s=30)

    data = received.event["data"]
    assert received.verified and received.event["type"] == "job.succeeded", data
    output = await _download(data["output_url"])
    assert [json.loads(line) for line in output.splitlines()] == records
    assert data["output_size"] == len(output) and "output" not in data
    assert data["output_sha256"] == hashlib.sha256(output).hexdigest()


async def test_given_a_record_the_schema_refuses_then_the_job_fails_naming_its_line_and_leaves_no_output(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    store_worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    store: ObjectStore,
) -> None:
    upload = await upload_bytes(store_client, b'{"sleep_ms": 0}\n{"sleep_ms": 0}\n{"sleep_ms": "soon"}\n')

    async with running_worker(SyntheticModel(), store_worker_settings):
        submitted = await store_client.post(
            "/v1/models/synthetic/jobs",
            json={"input_ref": upload["input_ref"], "input_format": "jsonl", "callback_url": receiver.url},
        )
        (received,) = await receiver.wait_for(1, timeout_s=30)

    data = received.event["data"]
    assert received.event["type"] == "job.failed" and data["attempts"] == 1, "permanent: no retry"
    assert "line 3 of input_ref" in data["error"] and "at /input/sleep_ms" in data["error"], data["error"]
    assert await store.size(f"outputs/{submitted.json()['id']}") is None


async def test_given_a_jsonl_input_url_then_the_worker_streams_it_from_the_server(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    store_worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    """Served in many small writes, without a Content-Length: the records still come whole."""
    records = [{"row": n, "text": "y" * 50} for n in range(2000)]

    async def serve(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        body = _jsonl(records)
        for start in range(0, len(body), 1000):
            await response.write(body[start : start + 1000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/records.jsonl", serve)
    allowed = replace(store_worker_settings, input_allow=AllowList.parse(["127.0.0.1"]))
    async with serving(app) as port, running_worker(EchoModel(), allowed):
        submitted = await store_client.post(
            "/v1/models/echo/jobs",
            json={
                "input_url": f"http://127.0.0.1:{port}/records.jsonl",
                "input_format": "jsonl",
                "callback_url": receiver.url,
            },
        )
        assert submitted.status_code == 202, submitted.text
        (received,) = await receiver.wait_for(1, timeout_s=30)

    assert received.event["type"] == "job.succeeded", received.event["data"]
    output = await _download(received.event["data"]["output_url"])
    assert [json.loads(line) for line in output.splitlines()] == records


@pytest.mark.parametrize(
    ("body", "slug"),
    [
        ({"input": [1, 2], "input_format": "jsonl"}, "validation-error"),
        ({"input_url": "http://127.0.0.1:9/x.jsonl", "input_format": "csv"}, "validation-error"),
    ],
)
async def test_given_a_jsonl_job_without_a_reference_then_it_is_refused_saying_why(
    store_client: httpx.AsyncClient, body: dict[str, Any], slug: str
) -> None:
    answer = await store_client.post("/v1/models/echo/jobs", json=body)

    assert answer.status_code == 422 and answer.json()["type"].endswith(slug), answer.text


async def test_given_no_object_store_then_a_jsonl_job_is_refused_its_output_has_nowhere_to_go(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.post(
        "/v1/models/echo/jobs", json={"input_url": "http://127.0.0.1:9/x.jsonl", "input_format": "jsonl"}
    )

    assert answer.status_code == 422 and answer.json()["type"].endswith("uploads-off")
    assert "object store" in answer.json()["detail"]


async def test_given_an_input_five_parts_long_then_the_worker_never_holds_it_or_its_output_whole(
    store: ObjectStore, store_worker_settings: WorkerSettings
) -> None:
    """40 MiB in, 40 MiB out (echo), through the worker's own streaming path: the most
    Python held at once (tracemalloc's peak, every thread) stays under twice the largest
    chunk it handles, an output part; the input or the output held whole would be five."""
    record = {"text": "z" * 10_000}
    line = msgspec.json.encode(record) + b"\n"
    count = 5 * PART_BYTES // len(line)
    key = f"uploads/anonymous/{uuid.uuid4().hex}"
    await store.put(key, line * count)
    job = Job(
        id=str(uuid.uuid4()), model="echo", input=None, submitted_at_ms=0, input_ref=key, input_format="jsonl"
    )

    async with PayloadReferences("echo", store_worker_settings) as payloads:
        lines = JsonLinesJobs(EchoModel(), payloads, max_records=128, max_line_bytes=2**20)
        tracemalloc.start()
        try:
            outcome = await lines.run(job, attempt=1)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert outcome.error is None and outcome.output_ref is not None, outcome
    assert outcome.output_ref.size == count * len(line) > 5 * PART_BYTES - len(line)
    assert peak_bytes < 2 * PART_BYTES, f"held {peak_bytes / 2**20:.1f} MiB at once"
    output = await store.read(f"outputs/{job.id}", 2**30)
    assert output is not None and hashlib.sha256(output).hexdigest() == outcome.output_ref.sha256
    assert bytes(output) == line * count


async def test_given_the_store_down_when_a_jsonl_job_runs_then_it_retries_and_succeeds_once_it_is_back(
    store_client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    store_worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    records = [{"n": n} for n in range(50)]
    upload = await upload_bytes(store_client, _jsonl(records))
    assert store_worker_settings.object_store is not None
    down = replace(
        store_worker_settings,
        object_store=replace(store_worker_settings.object_store, endpoint_url="http://127.0.0.1:9"),
    )

    async with running_worker(EchoModel(), down):
        submitted = await store_client.post(
            "/v1/models/echo/jobs",
            json={"input_ref": upload["input_ref"], "input_format": "jsonl", "callback_url": receiver.url},
        )
        what = "the first attempt, on a store that does not answer"
        await wait_until_tried(store_client, submitted.json()["id"], what)
    async with running_worker(EchoModel(), store_worker_settings):
        (received,) = await receiver.wait_for(1, timeout_s=30)

    data = received.event["data"]
    assert received.event["type"] == "job.succeeded" and data["attempts"] == 2, data
    output = await _download(data["output_url"])
    assert [json.loads(line) for line in output.splitlines()] == records
