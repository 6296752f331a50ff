"""Ingress efficiency: jobs/s the HTTP ingress accepts (202 after the broker's confirm)
against what a bare aio-pika publisher with pipelined confirms reaches on the same
broker, measured back to back in one run."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import aiohttp
import httpx

from contract.broker import Broker
from loadgen.bench_support import bench_topology, make_job, median, publish_jobs
from loadgen.stack_process import free_port

INGRESS_START_TIMEOUT_S = 30.0


async def _bare_rate(broker: Broker, count: int) -> float:
    jobs = [make_job("echo", {"n": i}) for i in range(count)]
    started = time.monotonic()
    await publish_jobs(broker, jobs)
    return count / (time.monotonic() - started)


async def _ingress_rate(base_url: str, count: int, concurrency: int) -> float:
    # aiohttp, not httpx, drives this load: on 2 cores httpx's client spends more CPU per
    # request than the ingress does, and the figure would measure the client.
    slots = asyncio.Semaphore(concurrency)
    accepted = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:

        async def submit(n: int) -> None:
            nonlocal accepted
            async with (
                slots,
                session.post(
                    "/v1/models/echo/jobs", json={"input": {"n": n}, "callback_url": "http://127.0.0.1:9/"}
                ) as response,
            ):
                await response.read()
                accepted += response.status == 202

        await asyncio.gather(*(submit(n) for n in range(min(count, 200))))  # warm-up: connections
        accepted = 0
        started = time.monotonic()
        await asyncio.gather(*(submit(n) for n in range(count)))
        elapsed_s = time.monotonic() - started
    if accepted != count:
        raise RuntimeError(f"the ingress accepted only {accepted} of {count} jobs")
    return count / elapsed_s


async def _wait_ready(base_url: str, ingress: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + INGRESS_START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url) as client:
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if ingress.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the ingress did not become ready")
            await asyncio.sleep(0.1)


async def measure_ingress(amqp_url: str, reps: int, count: int, concurrency: int = 64) -> dict[str, Any]:
    topology = bench_topology()
    port = free_port()
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "QUEUE_PREFIX": topology.prefix,
        "MODELS": "echo",
        "INGRESS_PORT": str(port),
        "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
    }
    ingress = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingress",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    broker = Broker(amqp_url, topology, ("echo",))
    await broker.connect()
    bare, via_ingress = [], []
    try:
        await _wait_ready(f"http://127.0.0.1:{port}", ingress)
        for _ in range(reps):
            bare.append(await _bare_rate(broker, count))
            via_ingress.append(await _ingress_rate(f"http://127.0.0.1:{port}", count, concurrency))
    finally:
        ingress.terminate()
        await ingress.wait()
        await broker.delete_topology()
        await broker.close()
    ratios = [i / b for i, b in zip(via_ingress, bare, strict=True)]
    return {
        "jobs": count,
        "concurrency": concurrency,
        "bare_publish_msgs_per_s": bare,
        "ingress_jobs_per_s": via_ingress,
        "ratio": median(ratios),
    }
