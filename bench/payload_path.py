"""Payloads by reference, as a user moves them: MB/s of 1 MiB-in / 1 MiB-out echo jobs
through the stack (upload presigned, PUT to the store, the job by `input_ref` answered
with `Prefer: wait`, the output downloaded from its `output_url` and its digest checked)
beside the same bytes moved directly to and from the same store (a presigned PUT and
GET), at the same concurrency, in the same run. And what one large job (50 MiB in, as
much out) costs each process in memory: the ingress and the dispatcher handle only its
reference; the worker holds a whole JSON input and its output (echo needs its input
whole), and of a JSON Lines one (`input_format: "jsonl"`, streamed) a batch of records
and an output part (8 MiB), whatever its size."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bench.budgets import RssWatch
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology, median
from loadgen.stack_process import StackProcess
from local_stack.local_services import LOCAL_STORE_KEYS, LOCAL_STORE_URL
from object_store.store import ObjectStore, StoreSettings

CONCURRENCY = 8
WAIT_S = 60
LARGE_JOB_BYTES = 50 * 2**20
WARM_UP_BYTES = 300 * 1024  # over OUTPUT_INLINE_MAX_BYTES: the output path warmed too
ROLES_HANDLING_JOBS = ("ingress", "worker", "dispatcher")


def _payload(size_bytes: int, n: int) -> bytes:
    """A JSON string of `size_bytes`, different for each job (a digest per job to check)."""
    head = f'"{n}:'.encode()
    return head + b"x" * (size_bytes - len(head) - 1) + b'"'


async def _in_turn(count: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Seconds to run `one(n)` for n in 0..count-1, CONCURRENCY at a time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)

    async def lane() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started


async def _direct(store: ObjectStore, http: aiohttp.ClientSession, count: int, size: int) -> float:
    async def one(n: int) -> None:
        body = _payload(size, n)
        key = f"bench/direct-{n}"
        async with http.put(await store.presigned_put(key, 600), data=body) as put:
            put.raise_for_status()
        async with http.get(await store.presigned_get(key, 600)) as get:
            if hashlib.sha256(await get.read()).digest() != hashlib.sha256(body).digest():
                raise RuntimeError(f"direct object {n} came back different")

    return await _in_turn(count, one)


async def _through_jobs(base_url: str, http: aiohttp.ClientSession, count: int, size: int) -> float:
    return await _in_turn(count, lambda n: _one_job(base_url, http, size, n))


def _records(size_bytes: int) -> bytes:
    """JSON Lines of about `size_bytes`, each record 1 KiB, compact as echo writes them back."""
    line = b'{"n":%d,"text":"' + b"y" * 1000 + b'"}\n'
    return b"".join(line % n for n in range(size_bytes // len(line)))


async def _one_job(base_url: str, http: aiohttp.ClientSession, size: int, n: int) -> None:
    await _job_by_reference(base_url, http, _payload(size, n), n, "json")


async def _job_by_reference(
    base_url: str, http: aiohttp.ClientSession, body: bytes, n: int, input_format: str
) -> None:
    """Upload, job by reference answered with Prefer: wait, output downloaded and checked."""
    async with http.post(f"{base_url}/v1/uploads") as created:
        upload = await created.json()
    async with http.put(upload["upload_url"], data=body) as put:
        put.raise_for_status()
    job = {"input_ref": upload["input_ref"], "input_format": input_format}
    headers = {"Prefer": f"wait={WAIT_S}"}
    async with http.post(f"{base_url}/v1/models/echo/jobs", json=job, headers=headers) as answered:
        result = await answered.json()
    if answered.status != 200 or result.get("status") != "succeeded":
        raise RuntimeError(f"job {n}: {answered.status} {str(result)[:300]}")
    async with http.get(result["output_url"]) as output:
        got = await output.read()
    if hashlib.sha256(got).hexdigest() != result["output_sha256"] or got != body:
        raise RuntimeError(f"job {n}: the output's bytes differ from the upload's")


async def measure_payload_path(amqp_url: str, reps: int, count: int, size_bytes: int) -> dict[str, Any]:
    topology = bench_topology()
    env = bench_stack_env(amqp_url, topology, generate_secret(), MODELS="echo")
    env.pop("S3_ENDPOINT_URL", None)  # the stack's own local store, which the direct runs use too
    stack = StackProcess(env)
    settings = StoreSettings(
        LOCAL_STORE_URL,
        os.environ.get("S3_BUCKET") or "inferq",
        access_key_id=LOCAL_STORE_KEYS["S3_ACCESS_KEY_ID"],
        secret_access_key=LOCAL_STORE_KEYS["S3_SECRET_ACCESS_KEY"],
    )
    megabytes = count * size_bytes / 2**20
    direct_runs: list[float] = []
    job_runs: list[float] = []
    try:
        await stack.start()
        timeout = aiohttp.ClientTimeout(total=WAIT_S * 2)
        async with ObjectStore(settings) as store, aiohttp.ClientSession(timeout=timeout) as http:
            # Warm-up: the replica up, with small jobs: the large ones' growth is then
            # measured from a worker that has not yet held a large payload.
            await _through_jobs(stack.base_url, http, CONCURRENCY, WARM_UP_BYTES)
            # The streamed job first: memory the whole one takes stays with the worker's
            # allocator, where the streamed one would reuse it and show nothing.
            lines = await _large_job_memory(stack.base_url, http, _records(LARGE_JOB_BYTES), "jsonl")
            large = await _large_job_memory(stack.base_url, http, _payload(LARGE_JOB_BYTES, 0), "json")
            for _ in range(reps):
                direct_runs.append(megabytes / await _direct(store, http, count, size_bytes))
                job_runs.append(megabytes / await _through_jobs(stack.base_url, http, count, size_bytes))
            for n in range(count):
                await store.delete(f"bench/direct-{n}")
    finally:
        await stack.stop()
        await delete_bench_topology(amqp_url, topology, ("echo",))
    return {
        "jobs": count,
        "payload_mib": size_bytes / 2**20,
        "concurrency": CONCURRENCY,
        "direct_mib_per_s": direct_runs,
        "jobs_mib_per_s": job_runs,
        "ratio": median(job_runs) / median(direct_runs),
        "large_job": large,
        "large_lines_job": lines,
    }


async def _large_job_memory(
    base_url: str, http: aiohttp.ClientSession, body: bytes, input_format: str
) -> dict[str, Any]:
    """One echo job of `body` in and as much out by reference, each process's RSS watched."""
    watch = RssWatch(ROLES_HANDLING_JOBS)
    watch.start()
    started = time.perf_counter()
    await _job_by_reference(base_url, http, body, 0, input_format)
    elapsed_s = time.perf_counter() - started
    rss = await watch.stop()
    return {"payload_mib": len(body) / 2**20, "elapsed_s": elapsed_s, "rss": rss}


def payload_markdown(result: dict[str, Any]) -> list[str]:
    large, lines = result["large_job"], result["large_lines_job"]
    return [
        "",
        f"Payloads by reference: {result['jobs']} echo jobs of {result['payload_mib']:g} MiB in and out, "
        f"{result['concurrency']} at a time (upload, job with Prefer: wait, output downloaded and checked): "
        f"{median(result['jobs_mib_per_s']):.1f} MiB/s; the same bytes PUT and GET directly to the same "
        f"store: {median(result['direct_mib_per_s']):.1f} MiB/s; ratio {result['ratio']:.2f}",
        "",
        f"One echo job of {large['payload_mib']:g} MiB in and out by reference, "
        f"{large['elapsed_s']:.1f} s end to end; each process's RSS growth (peak over before): "
        + ", ".join(f"{role} +{r['growth_mb']:.1f} MB" for role, r in large["rss"].items()),
        "",
        f"One echo job of {lines['payload_mib']:.0f} MiB of JSON Lines in and out (input_format jsonl, "
        f"streamed), {lines['elapsed_s']:.1f} s end to end; each process's RSS growth: "
        + ", ".join(f"{role} +{r['growth_mb']:.1f} MB" for role, r in lines["rss"].items()),
    ]
