"""Ingress efficiency: jobs/s the HTTP ingress accepts (202 after the broker's confirm)
against what a bare aio-pika publisher with pipelined confirms reaches on the same
broker, with the job records on (REDIS_URL) against off, and with demand events on
(DEMAND_EVENTS) against off, measured back to back in one run, their order rotated
from one repetition to the next. Then `Prefer: wait=5` on echo at low load: one job at
a time, answered 200 with the output, with an echo worker in this process."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp

from broker.client import Broker
from loadgen.measurement import bench_topology, forget_records, make_job, median, percentile, publish_jobs
from loadgen.stack_process import start_ingress
from ray_workers.job_worker import JobWorker
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings


async def _bare_rate(broker: Broker, count: int) -> float:
    jobs = [make_job("echo", {"n": i}) for i in range(count)]
    started = time.monotonic()
    await publish_jobs(broker, jobs)
    return count / (time.monotonic() - started)


async def _wait_latencies_ms(base_url: str, count: int) -> list[float]:
    latencies_ms = []
    async with aiohttp.ClientSession(base_url) as session:
        for n in range(count + 20):  # the first 20 warm the connection and the worker up
            started = time.perf_counter()
            async with session.post(
                "/v1/models/echo/jobs", json={"input": {"n": n}}, headers={"Prefer": "wait=5"}
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"Prefer: wait=5 answered {response.status}, not 200")
            if n >= 20:
                latencies_ms.append((time.perf_counter() - started) * 1000)
    return latencies_ms


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


async def measure_ingress(
    amqp_url: str, redis_url: str, reps: int, count: int, concurrency: int = 64, waits: int = 200
) -> dict[str, Any]:
    topology = bench_topology()
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "QUEUE_PREFIX": topology.prefix,
        "MODELS": "echo",
        "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
    }
    broker = Broker(amqp_url, topology, ("echo",))
    await broker.connect()
    started: list[asyncio.subprocess.Process] = []
    bare: list[float] = []
    records_off: list[float] = []
    records_on: list[float] = []
    events_off: list[float] = []
    try:
        without, without_url = await start_ingress({**env, "REDIS_URL": "off"})
        started.append(without)
        with_records, with_url = await start_ingress({**env, "REDIS_URL": redis_url})
        started.append(with_records)
        silent, silent_url = await start_ingress({**env, "REDIS_URL": "off", "DEMAND_EVENTS": "0"})
        started.append(silent)
        variants = [(records_off, without_url), (records_on, with_url), (events_off, silent_url)]
        for rep in range(reps):
            bare.append(await _bare_rate(broker, count))
            # Rotated: the queue grows through a repetition, and no variant always goes last.
            for rates, url in variants[rep % 3 :] + variants[: rep % 3]:
                rates.append(await _ingress_rate(url, count, concurrency))
        for queue in (*topology.job_queues("echo"), *topology.chunk_queues("echo")):
            await broker.purge(queue)
        settings = WorkerSettings(amqp_url=amqp_url, models=("echo",), topology=topology, redis_url=redis_url)
        worker = JobWorker(EchoModel(), settings)
        await worker.start()
        try:
            wait_ms = await _wait_latencies_ms(with_url, waits)
        finally:
            await worker.stop()
    finally:
        for process in started:
            process.terminate()
            await process.wait()
        await broker.delete_topology()
        await broker.close()
        await forget_records(redis_url, topology.prefix)
    ratios = [i / b for i, b in zip(records_off, bare, strict=True)]
    return {
        "jobs": count,
        "concurrency": concurrency,
        "bare_publish_msgs_per_s": bare,
        "ingress_jobs_per_s": records_off,
        "ingress_with_records_jobs_per_s": records_on,
        "ingress_without_demand_events_jobs_per_s": events_off,
        "demand_events_ratio": median([on / off for on, off in zip(records_off, events_off, strict=True)]),
        "ratio": median(ratios),
        "records_ratio": median([on / off for on, off in zip(records_on, records_off, strict=True)]),
        "wait_p50_ms": median(wait_ms),
        "wait_p99_ms": percentile(wait_ms, 99),
        "waits": waits,
    }
