"""`task demo`: start the local stack, send real jobs, show what comes back, stop.

Jobs go over HTTP to the ingress; results come back as signed callbacks to a receiver
inside this process, which verifies each signature with a Standard Webhooks library.
Then a batch of embed-minilm jobs in one request, an input too large for a request
uploaded to the object store and named by reference, and jobs without a callback: waited
for, replayed, polled and canceled (`demo_records`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx

from callbacks.signing import generate_secret
from loadgen.callback_receiver import CallbackReceiver, ReceivedCallback
from loadgen.demo_records import records_tour
from loadgen.message_trace import TraceUnavailable, traced_messages
from loadgen.scale_report import FirstJob, scale_from_zero
from loadgen.stack_process import StackProcess
from settings.environment import DEFAULT_AMQP_URL

CALLBACK_TIMEOUT_S = 60.0
SCALE_LOG_WAIT_S = 10.0
BATCH_SENTENCES = 200
# 8 MiB of JSON: eight times what one request may carry (MAX_BODY_BYTES, 1 MiB).
LARGE_INPUT = {"documents": [{"n": n, "text": "lorem ipsum " * 80} for n in range(8520)]}
# What a job by reference may put in any one broker message, at most (its reference).
SMALL_MESSAGE_BYTES = 64 * 1024
SMALL_INPUT = {"small": True}

DEMO_JOBS: list[tuple[str, str, Any]] = [
    ("echo", "high", {"greeting": "hello", "n": 1}),
    ("echo", "normal", ["any", "json", 3.5]),
    ("echo", "low", "a plain string"),
    ("embed-minilm", "high", "The cat sits on the mat."),
    ("embed-minilm", "normal", {"texts": ["A kitten rests on a rug.", "Stock markets fell today."]}),
    ("embed-minilm", "low", {"texts": ["Queues decouple producers from consumers."]}),
]


@dataclass
class Submitted:
    model: str
    priority: str
    job_id: str
    accepted_ms: float
    submitted_at: float
    submitted_wall_s: float


def _summary(model: str, event: dict[str, Any]) -> str:
    data = event["data"]
    if data["status"] != "succeeded":
        return f"error: {data.get('error')}"
    output = data["output"]
    if model != "embed-minilm":
        return f"output = {output!r}"[:60]
    vectors = output["embeddings"]
    norm = math.sqrt(sum(v * v for v in vectors[0]))
    head = [round(v, 3) for v in vectors[0][:3]]
    return f"{len(vectors)} x {len(vectors[0])}-dim, |v|={norm:.3f}, v[:3]={head}"


def _print_table(submitted: list[Submitted], received: dict[str, tuple[ReceivedCallback, float]]) -> None:
    header = (
        f"{'model':<13}{'prio':<7}{'status':<10}{'sig':<5}{'202 ms':>8}{'queued':>9}{'infer':>8}"
        f"{'batch':>6}{'total ms':>10}  result"
    )
    print(header)
    print("-" * len(header))
    for job in submitted:
        callback, arrived = received[job.job_id]
        data = callback.event["data"]
        timings = data["timings"]
        total_ms = (arrived - job.submitted_at) * 1000
        print(
            f"{job.model:<13}{job.priority:<7}{data['status']:<10}{'ok' if callback.verified else 'BAD':<5}"
            f"{job.accepted_ms:>8.1f}{timings['queued_ms']:>9.1f}{timings['inference_ms']:>8.1f}"
            f"{timings['batch_size']:>6}{total_ms:>10.1f}  {_summary(job.model, callback.event)}"
        )
    print(
        "\n202 ms: submit to broker-confirmed 202; queued: accepted to batch start; infer: model time "
        "of the batch; total: submit to verified callback."
    )


async def _submit_all(base_url: str, callback_url: str) -> list[Submitted]:
    submitted = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for model, priority, job_input in DEMO_JOBS:
            started, started_wall_s = time.monotonic(), time.time()
            response = await client.post(
                f"/v1/models/{model}/jobs",
                json={
                    "input": job_input,
                    "callback_url": callback_url,
                    "priority": priority,
                    "metadata": {"demo": True},
                },
            )
            response.raise_for_status()
            submitted.append(
                Submitted(
                    model,
                    priority,
                    response.json()["id"],
                    (time.monotonic() - started) * 1000,
                    started,
                    started_wall_s,
                )
            )
    return submitted


async def _exchange(stack: StackProcess, receiver: CallbackReceiver) -> int:
    submitted = await _submit_all(stack.base_url, receiver.url)
    callbacks = await receiver.wait_for(len(submitted), CALLBACK_TIMEOUT_S)
    received = {c.event["data"]["id"]: (c, c.received_monotonic_s) for c in callbacks}
    _print_table(submitted, received)
    # The autoscaler logs a wake-up once Serve reports the replica ready, which can be a
    # moment after the replica already answered: give the log a bounded moment.
    await stack.wait_for_output([f"autoscaler {job.model}: 0 ->" for job in submitted], SCALE_LOG_WAIT_S)
    _print_scaling(stack.output(), submitted, received)
    ok = all(c.verified and c.event["type"] == "job.succeeded" for c in callbacks)
    ok &= await _batch(stack.base_url, receiver)
    ok &= await _by_reference(stack.base_url, receiver)
    ok &= await records_tour(stack.base_url)
    return 0 if ok else 1


async def _batch(base_url: str, receiver: CallbackReceiver) -> bool:
    """A backlog in one request: BATCH_SENTENCES sentences, each a job of its own."""
    already = len(receiver.received)
    jobs = [
        {"input": f"Sentence number {n} of a nightly batch.", "callback_url": receiver.url}
        for n in range(BATCH_SENTENCES)
    ]
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post("/v1/models/embed-minilm/jobs/batch", json={"jobs": jobs})
    accepted_ms = (time.monotonic() - started) * 1000
    if response.status_code != 202:
        print(f"\nbatch: {response.status_code} {response.text[:300]}")
        return False
    ids = {job["id"] for job in response.json()["jobs"]}
    callbacks = await receiver.wait_for(already + len(ids), CALLBACK_TIMEOUT_S)
    mine = [c for c in callbacks[already:] if c.event["data"]["id"] in ids]
    done_s = max(c.received_monotonic_s for c in mine) - started
    sizes = sorted({c.event["data"]["timings"]["batch_size"] for c in mine})
    print(
        f"\nbatch: {len(ids)} embed-minilm jobs in one request: 202 in {accepted_ms:.0f} ms (every job "
        f"confirmed), {len(mine)} verified callbacks within {done_s:.1f} s, "
        f"model batches of {sizes[0]}-{sizes[-1]}"
    )
    return len(mine) == len(ids) and all(c.verified and c.event["type"] == "job.succeeded" for c in mine)


async def _by_reference(base_url: str, receiver: CallbackReceiver) -> bool:
    """An 8 MiB input uploaded straight to the store and run by reference, beside a small
    inline job, with the broker tracing every message published meanwhile."""
    body = json.dumps(LARGE_INPUT).encode()
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    try:
        async with traced_messages(amqp_url, os.environ.get("RABBITMQ_MANAGEMENT_URL")) as traced:
            ran = await _large_and_small(base_url, receiver, body)
    except TraceUnavailable as exc:
        print(f"\nby reference: the broker's trace is unavailable: {exc}")
        return False
    if ran is None:
        return False
    large, small, called_back_s = ran
    data = large.event["data"]
    async with httpx.AsyncClient(timeout=60) as client:
        output = await client.get(data["output_url"])
    same = output.status_code == 200 and json.loads(output.content) == LARGE_INPUT
    largest = max(traced, key=lambda message: message.size, default=None)
    small_messages = largest is not None and len(traced) >= 2 and largest.size <= SMALL_MESSAGE_BYTES
    print(
        f"\nby reference: a {len(body) / 2**20:.1f} MiB JSON input (a request may carry 1 MiB) PUT straight "
        f"to the object store, named as input_ref; the verified callback in {called_back_s:.1f} s carried "
        f"output_url ({data['output_size'] / 2**20:.1f} MiB), whose download "
        f"{'equals the upload' if same else 'DIFFERS from the upload'}; a small job's output came "
        f"{'inline' if 'output' in small.event['data'] else 'NOT inline'}"
    )
    if largest is not None:
        print(
            f"  the broker traced {len(traced)} messages published meanwhile, "
            f"{sum(m.size for m in traced) / 1024:.1f} KiB in all; the largest {largest.size} bytes "
            f"(to {largest.exchange or 'the default exchange'} {','.join(largest.routing_keys)}): "
            f"{'under' if small_messages else 'NOT under'} {SMALL_MESSAGE_BYTES // 1024} KiB"
        )
    inline = small.event["data"].get("output") == SMALL_INPUT
    return same and inline and small_messages and large.verified and small.verified


async def _large_and_small(
    base_url: str, receiver: CallbackReceiver, body: bytes
) -> tuple[ReceivedCallback, ReceivedCallback, float] | None:
    """The large job's and the small job's callbacks, and the seconds to the large one."""
    already = len(receiver.received)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        upload = await client.post("/v1/uploads")
        if upload.status_code != 201:
            print(f"\nupload: {upload.status_code} {upload.text[:300]}")
            return None
        put = await client.put(upload.json()["upload_url"], content=body)
        by_reference = {"input_ref": upload.json()["input_ref"], "callback_url": receiver.url}
        large = await client.post("/v1/models/echo/jobs", json=by_reference)
        small = await client.post(
            "/v1/models/echo/jobs", json={"input": SMALL_INPUT, "callback_url": receiver.url}
        )
    if put.status_code != 200 or large.status_code != 202 or small.status_code != 202:
        print(
            f"\nupload: PUT {put.status_code}, jobs {large.status_code} {small.status_code}: "
            f"{large.text[:200]}"
        )
        return None
    callbacks = await receiver.wait_for(already + 2, CALLBACK_TIMEOUT_S)
    by_id = {c.event["data"]["id"]: c for c in callbacks[already:]}
    large_callback, small_callback = by_id[large.json()["id"]], by_id[small.json()["id"]]
    if "output_url" not in large_callback.event["data"]:
        print(f"\nby reference: the output came inline, not by reference: {str(large_callback.event)[:200]}")
        return None
    return large_callback, small_callback, large_callback.received_monotonic_s - started


def _print_scaling(
    log: str, submitted: list[Submitted], received: dict[str, tuple[ReceivedCallback, float]]
) -> None:
    first_jobs: dict[str, FirstJob] = {}
    for job in submitted:
        callback, arrived = received[job.job_id]
        first_jobs.setdefault(
            job.model,
            FirstJob(
                job.submitted_wall_s,
                arrived - job.submitted_at,
                callback.event["data"]["timings"]["inference_ms"],
            ),
        )
    report = scale_from_zero(log, first_jobs)
    if not report:
        return
    print("\nscale from zero (local autoscaler applying each model's ScaledObject;")
    print("detection = the ingress's demand event,")
    print("or without one a poll: pollingInterval + the management API's 5 s statistics refresh):")
    for wake in report:
        load = "?" if wake.model_load_s is None else f"{wake.model_load_s:.2f}"
        print(
            f"  {wake.model:<13} 0 -> 1: detected after {wake.detection_s:.1f} s, replica up in "
            f"{wake.replica_start_s:.1f} s (model load {load} s), first batch {wake.first_batch_ms:.0f} ms; "
            f"callback {wake.callback_s:.1f} s after submission"
        )


async def run_demo() -> int:
    secret = generate_secret()
    receiver = CallbackReceiver(secret)
    await receiver.start()
    stack = StackProcess({**os.environ, "WEBHOOK_SECRET": secret, "CALLBACK_ALLOW_HOSTS": "127.0.0.1"})
    print(
        f"starting the local stack (ingress :{stack.port}, Ray Serve workers); its log: {stack.log}",
        flush=True,
    )
    try:
        ready_s = await stack.start()
        print(f"stack ready in {ready_s:.1f} s; submitting {len(DEMO_JOBS)} jobs\n", flush=True)
        return await _exchange(stack, receiver)
    finally:
        code = await stack.stop()
        print(f"\nstack stopped (exit {code})")
        await receiver.stop()


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except (RuntimeError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
