"""Pipeline overhead: submit-to-callback latency of `echo` at low load (open loop), less
model time, against calling the same Ray Serve deployment over Serve's own HTTP path,
both on one running stack in one run."""

from __future__ import annotations

import time
from typing import Any

import httpx

from callbacks.signing import generate_secret
from loadgen.callback_receiver import CallbackReceiver
from loadgen.measurement import (
    bench_stack_env,
    bench_topology,
    delete_bench_topology,
    median,
    open_loop,
    percentile,
)
from loadgen.stack_process import StackProcess, free_port

CALLBACK_TIMEOUT_S = 60.0


async def _queued_latencies(
    base_url: str, receiver: CallbackReceiver, rate: float, count: int
) -> list[float]:
    sent_at: dict[str, float] = {}
    already = len(receiver.received)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:

        async def fire(n: int) -> None:
            started = time.monotonic()
            response = await client.post(
                "/v1/models/echo/jobs", json={"input": n, "callback_url": receiver.url}
            )
            sent_at[response.json()["id"]] = started

        await open_loop(rate, count, fire)
    callbacks = (await receiver.wait_for(already + count, CALLBACK_TIMEOUT_S))[already:]
    return [
        c.received_monotonic_s
        - sent_at[c.event["data"]["id"]]
        - c.event["data"]["timings"]["inference_ms"] / 1000
        for c in callbacks
    ]


async def _direct_latencies(serve_url: str, rate: float, count: int) -> list[float]:
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=serve_url, timeout=30) as client:

        async def fire(n: int) -> None:
            started = time.monotonic()
            response = await client.post("/direct/echo", json=n)
            response.raise_for_status()
            latencies.append(time.monotonic() - started)

        await open_loop(rate, count, fire)
    return latencies


async def measure_pipeline(amqp_url: str, reps: int, rate: float, count: int) -> dict[str, Any]:
    secret = generate_secret()
    receiver = CallbackReceiver(secret)
    await receiver.start()
    serve_port = free_port()
    topology = bench_topology()
    stack = StackProcess(
        bench_stack_env(
            amqp_url, topology, secret, MODELS="echo", LOCAL_AUTOSCALER="0", SERVE_HTTP_PORT=str(serve_port)
        )
    )
    runs = []
    try:
        await stack.start()
        serve_url = f"http://127.0.0.1:{serve_port}"
        await _queued_latencies(stack.base_url, receiver, rate, 5)  # warm-up
        await _direct_latencies(serve_url, rate, 5)
        for _ in range(reps):
            queued = await _queued_latencies(stack.base_url, receiver, rate, count)
            direct = await _direct_latencies(serve_url, rate, count)
            runs.append(
                {
                    "queued_p50_ms": percentile(queued, 50) * 1000,
                    "queued_p99_ms": percentile(queued, 99) * 1000,
                    "direct_p50_ms": percentile(direct, 50) * 1000,
                    "direct_p99_ms": percentile(direct, 99) * 1000,
                }
            )
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, ("echo",))
    return {
        "rate_per_s": rate,
        "jobs_per_run": count,
        "runs": runs,
        "queued_p50_ms": median([r["queued_p50_ms"] for r in runs]),
        "queued_p99_ms": median([r["queued_p99_ms"] for r in runs]),
        "ratio_p50": median([r["queued_p50_ms"] / r["direct_p50_ms"] for r in runs]),
        "ratio_p99": median([r["queued_p99_ms"] / r["direct_p99_ms"] for r in runs]),
    }
