"""Batch submission over HTTP against the real broker and Redis: all or nothing, each job
its own (id, record, cancel, callback), the Idempotency-Key over the whole batch, and
the limits."""

from __future__ import annotations

import dataclasses
from typing import Any

import aio_pika
import httpx
import pytest

from callbacks.dispatcher import CallbackDispatcher
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.settings import WorkerSettings
from tests.conftest import fresh_topology, jobs_held, queue_holds, running_ingress, running_worker, wait_until
from tests.models import RecordingModel
from wire.topology import Topology


async def _batch(
    client: httpx.AsyncClient, jobs: list[dict[str, Any]], model: str = "echo", **headers: str
) -> httpx.Response:
    return await client.post(f"/v1/models/{model}/jobs/batch", json={"jobs": jobs}, headers=headers)


async def test_given_a_batch_then_each_job_runs_alone_and_calls_back_with_its_own_id_and_output(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
) -> None:
    jobs = [{"input": {"n": n}, "callback_url": receiver.url, "metadata": {"n": n}} for n in range(50)]
    jobs[7]["priority"] = "high"

    accepted = await _batch(client, jobs)
    async with running_worker(RecordingModel(), worker_settings):
        callbacks = await receiver.wait_for(50, timeout_s=20)
    ids = [job["id"] for job in accepted.json()["jobs"]]
    outputs = {c.event["data"]["id"]: c.event["data"]["output"] for c in callbacks}
    record = (await client.get(f"/v1/jobs/{ids[7]}")).json()

    assert accepted.status_code == 202, accepted.text
    assert len(set(ids)) == 50
    assert [job["status"] for job in accepted.json()["jobs"]] == ["queued"] * 50
    assert accepted.json()["jobs"][7]["priority"] == "high"
    assert all(c.verified for c in callbacks) and len({c.webhook_id for c in callbacks}) == 50
    assert outputs == {job_id: {"n": n} for n, job_id in enumerate(ids)}
    assert record["status"] == "succeeded" and record["metadata"] == {"n": 7} and record["priority"] == "high"


async def test_given_bad_jobs_in_a_batch_then_422_names_each_by_pointer_and_nothing_is_queued(
    client: httpx.AsyncClient, topology: Topology, amqp_url: str
) -> None:
    jobs: list[dict[str, Any]] = [{"input": {"sleep_ms": 1}} for _ in range(20)]
    jobs[17] = {"input": {"sleep_ms": -1}}
    jobs[3] = {"input": None, "callback_url": "http://169.254.169.254/latest/meta-data"}
    bad_schema = await _batch(client, jobs, model="synthetic")
    typed: list[dict[str, Any]] = [{"input": 1} for _ in range(6)]
    typed[5]["priority"] = "urgent"
    bad_type = await _batch(client, typed)
    unknown_field = await _batch(client, [{"input": 1}, {"input": 2, "colour": "red"}])

    assert bad_schema.status_code == 422
    assert bad_schema.headers["content-type"] == "application/problem+json"
    body = bad_schema.json()
    assert body["type"].endswith("/invalid-jobs") and body["invalid_jobs"] == 2
    assert [error["pointer"] for error in body["errors"]] == [
        "/jobs/3/callback_url",
        "/jobs/17/input/sleep_ms",
    ]
    assert [error["type"] for error in body["errors"]] == ["invalid-callback-url", "invalid-input"]
    assert bad_type.status_code == 422 and bad_type.json()["errors"][0]["pointer"] == "/jobs/5/priority"
    assert unknown_field.status_code == 422 and unknown_field.json()["errors"][0]["pointer"] == "/jobs/1"
    assert await jobs_held(amqp_url, topology, "synthetic") == 0
    assert await jobs_held(amqp_url, topology, "echo") == 0


async def test_given_batches_outside_the_limits_then_they_are_refused_with_the_limit_named(
    ingress_settings: IngressSettings, topology: Topology, amqp_url: str
) -> None:
    settings = dataclasses.replace(ingress_settings, batch_max_jobs=5, max_batch_body_bytes=4096)
    async with running_ingress(settings) as client:
        empty = await _batch(client, [])
        too_many = await _batch(client, [{"input": n} for n in range(6)])
        too_large = await _batch(client, [{"input": "x" * 5000}])
        not_json = await client.post(
            "/v1/models/echo/jobs/batch", content=b'{"jobs": [', headers={"content-type": "application/json"}
        )
        unknown_model = await _batch(client, [{"input": 1}], model="nope")
        at_limit = await _batch(client, [{"input": n} for n in range(5)])

    assert empty.status_code == 422 and empty.json()["type"].endswith("/batch-size")
    assert too_many.status_code == 422 and too_many.json()["limit"] == "BATCH_MAX_JOBS"
    assert too_large.status_code == 413 and "MAX_BATCH_BODY_BYTES" in too_large.json()["detail"]
    assert not_json.status_code == 400 and unknown_model.status_code == 404
    assert at_limit.status_code == 202 and len(at_limit.json()["jobs"]) == 5
    assert await jobs_held(amqp_url, topology, "echo") == 5


async def test_given_a_batch_over_max_queue_length_then_503_and_none_of_it_is_queued(
    ingress_settings: IngressSettings, topology: Topology, amqp_url: str
) -> None:
    settings = dataclasses.replace(
        ingress_settings, topology=dataclasses.replace(topology, max_queue_length=10)
    )
    async with running_ingress(settings) as client:
        first = await _batch(client, [{"input": n} for n in range(6)])
        refused = await _batch(client, [{"input": n} for n in range(5)])
        fits = await _batch(client, [{"input": n} for n in range(4)])

    assert first.status_code == 202
    assert refused.status_code == 503 and refused.json()["type"].endswith("/queue-full")
    assert refused.headers["retry-after"]
    assert fits.status_code == 202
    assert await jobs_held(amqp_url, topology, "echo") == 10


async def test_given_an_idempotency_key_then_the_batch_is_queued_once_and_replayed_with_the_same_ids(
    client: httpx.AsyncClient, topology: Topology, amqp_url: str
) -> None:
    jobs = [{"input": n} for n in range(8)]
    first = await _batch(client, jobs, **{"Idempotency-Key": "batch-1"})
    again = await _batch(client, jobs, **{"Idempotency-Key": "batch-1"})
    other_body = await _batch(client, jobs[:7], **{"Idempotency-Key": "batch-1"})
    single_same_key = await client.post(
        "/v1/models/echo/jobs", json={"input": 1}, headers={"Idempotency-Key": "batch-1"}
    )

    assert first.status_code == 202 and again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert [job["id"] for job in again.json()["jobs"]] == [job["id"] for job in first.json()["jobs"]]
    assert [job["status"] for job in again.json()["jobs"]] == ["queued"] * 8
    assert other_body.status_code == 422 and other_body.json()["type"].endswith("/idempotency-key-reused")
    assert single_same_key.status_code == 422
    assert await jobs_held(amqp_url, topology, "echo") == 8


@pytest.mark.parametrize("quick_batch_s", [0.0, 1.0], ids=["marked-first", "quick"])
async def test_given_one_job_of_a_batch_canceled_then_it_alone_does_not_end_otherwise(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    quick_batch_s: float,
) -> None:
    accepted = await _batch(client, [{"input": n, "callback_url": receiver.url} for n in range(5)])
    ids = [job["id"] for job in accepted.json()["jobs"]]
    canceled = await client.post(f"/v1/jobs/{ids[2]}/cancel")
    model = RecordingModel()
    async with running_worker(model, dataclasses.replace(worker_settings, quick_batch_s=quick_batch_s)):
        callbacks = await receiver.wait_for(5, timeout_s=15)

        async def all_ended() -> bool:
            records = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
            return all(record["status"] in ("succeeded", "canceled") for record in records)

        await wait_until(all_ended, 10, "every job of the batch to end")
    types = {c.event["data"]["id"]: c.event["type"] for c in callbacks}

    assert canceled.status_code == 200
    assert types == {job_id: "job.canceled" if n == 2 else "job.succeeded" for n, job_id in enumerate(ids)}
    ran = sum(len(batch.attempts) for batch in model.batches)
    # Marked running first, it never reaches the model; a quick batch may run it, and drops its ending.
    assert ran in ((4, 5) if quick_batch_s else (4,))


async def test_given_the_broker_takes_part_of_a_batch_then_503_says_which_jobs_are_queued(
    ingress_settings: IngressSettings, amqp_url: str, redis_url: str
) -> None:
    """An operator unbound the high-priority queue: those jobs are unroutable, the rest
    are queued and accepted; the answer says which is which, and a retry under the key
    sends the batch again with the same ids once the queue is bound again."""
    async with fresh_topology(amqp_url, redis_url, "quorum") as quorum:
        settings = dataclasses.replace(ingress_settings, topology=quorum)
        jobs: list[dict[str, Any]] = [{"input": n} for n in range(4)]
        jobs[1]["priority"] = "high"
        high_queue = quorum.job_queue("echo", "high")
        (binding,) = next(spec for spec in quorum.queues(("echo",)) if spec.name == high_queue).bindings
        async with running_ingress(settings) as client, await aio_pika.connect(amqp_url) as connection:
            channel = await connection.channel()
            queue = await channel.get_queue(high_queue)
            await queue.unbind(*binding)
            unkeyed = await _batch(client, jobs)
            keyed = await _batch(client, jobs, **{"Idempotency-Key": "part"})
            records = [
                (await client.get(f"/v1/jobs/{job['id']}")).status_code for job in unkeyed.json()["jobs"]
            ]
            await queue.bind(*binding)
            retried = await _batch(client, jobs, **{"Idempotency-Key": "part"})

        assert unkeyed.status_code == 503 and unkeyed.json()["type"].endswith("/batch-partly-queued")
        assert [job["status"] for job in unkeyed.json()["jobs"]] == [
            "queued",
            "not-queued",
            "queued",
            "queued",
        ]
        assert records == [200, 404, 200, 200]
        assert keyed.status_code == 503
        assert retried.status_code == 202
        assert [job["id"] for job in retried.json()["jobs"]] == [job["id"] for job in keyed.json()["jobs"]]
        assert await queue_holds(amqp_url, quorum.job_queue("echo", "normal"), 3 + 3 + 3)
        assert await queue_holds(amqp_url, high_queue, 1)
