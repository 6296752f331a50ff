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
from loadgen.scale_report import FirstJob, scale_from_zero
from loadgen.stack_process import StackProcess

CALLBACK_TIMEOUT_S = 60.0
SCALE_LOG_WAIT_S = 10.0
BATCH_SENTENCES = 200
# Twice what one request may carry (MAX_BODY_BYTES, 1 MiB).
LARGE_INPUT = {"documents": [{"n": n, "text": "lorem ipsum " * 80} for n in range(2200)]}

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
    """An input over the request limit: uploaded straight to the store, run by reference."""
    already = len(receiver.received)
    body = json.dumps(LARGE_INPUT).encode()
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        upload = await client.post("/v1/uploads")
        if upload.status_code != 201:
            print(f"\nupload: {upload.status_code} {upload.text[:300]}")
            return False
        put = await client.put(upload.json()["upload_url"], content=body)
        by_reference = {"input_ref": upload.json()["input_ref"], "callback_url": receiver.url}
        job = await client.post("/v1/models/echo/jobs", json=by_reference)
    if put.status_code != 200 or job.status_code != 202:
        print(f"\nupload: PUT {put.status_code}, job {job.status_code} {job.text[:300]}")
        return False
    callbacks = await receiver.wait_for(already + 1, CALLBACK_TIMEOUT_S)
    (callback,) = [c for c in callbacks[already:] if c.event["data"]["id"] == job.json()["id"]]
    called_back_s = time.monotonic() - started
    data = callback.event["data"]
    if "output_url" not in data:
        print(f"\nby reference: the output came inline, not by reference: {str(data)[:200]}")
        return False
    async with httpx.AsyncClient(timeout=30) as client:
        output = await client.get(data["output_url"])
    same = output.status_code == 200 and json.loads(output.content) == LARGE_INPUT
    print(
        f"\nby reference: a {len(body) / 2**20:.1f} MiB input (a request may carry 1 MiB) PUT straight to "
        f"the object store, named as input_ref; the verified callback in {called_back_s:.1f} s carried "
        f"output_url ({data['output_size'] / 2**20:.1f} MiB), whose download "
        f"{'equals the upload' if same else 'DIFFERS from the upload'}"
    )
    return same and callback.verified


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
