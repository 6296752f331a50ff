"""The two ways a batch could travel, measured on the message path alone.

- `per-job messages` (what the ingress does): each job of a batch is its own persistent
  message, all published pipelined with one wait for the confirms, and consumed and
  acked one by one (acks `multiple`, as the worker settles a batch).
- `chunk messages` (the option not taken): CHUNK_JOBS jobs per message, which a worker
  would split.

Both publish the same jobs, confirmed, to a model's queue through the broker client the
services use, then consume and ack all of them; the figure is the CPU per job of this process (the client
side of the ingress and the worker together) and of the broker. What a chunk saves is
the per-message cost; what it would cost is in the docs (queue length counts messages).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bench import cpu_accounting
from broker.client import Broker, Delivery, ack_all
from loadgen.measurement import bench_topology, median
from wire.envelope import Job
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage

CHUNK_JOBS = 32
PREFETCH = 256


async def measure_batch_options(amqp_url: str, reps: int, jobs: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"per-job messages": [], "chunk messages": []}
    for _ in range(reps):
        for option, per_message in (("per-job messages", 1), ("chunk messages", CHUNK_JOBS)):
            runs[option].append(await _one_run(amqp_url, jobs, per_message))
    summary = {
        option: {
            part: median([run[part] for run in option_runs])
            for part in ("client_ms", "broker_ms", "total_ms")
        }
        for option, option_runs in runs.items()
    }
    saved = summary["per-job messages"]["total_ms"] - summary["chunk messages"]["total_ms"]
    return {"runs": runs, "summary": summary, "chunk_jobs": CHUNK_JOBS, "saved_ms_per_job": saved}


async def _one_run(amqp_url: str, jobs: int, per_message: int) -> dict[str, float]:
    """Publish `jobs` jobs, `per_message` to a message, to a model's queue (a fresh topology),
    confirmed and pipelined as the ingress publishes; consume and ack them as a worker does."""
    topology = bench_topology()
    broker = Broker(amqp_url, topology, ("echo",))
    await broker.connect()
    try:
        bodies = [job_message(_job(n)).body for n in range(jobs)]
        messages = [
            OutgoingMessage(
                b'{"schema_version":1,"jobs":[' + b",".join(bodies[first : first + per_message]) + b"]}"
                if per_message > 1
                else bodies[first],
                message_id=str(first),
                priority=1,
            )
            for first in range(0, jobs, per_message)
        ]
        before = cpu_accounting.snapshot()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                broker.publish(
                    message, topology.job_routing_key("echo", "normal"), exchange=topology.jobs_exchange
                )
                for message in messages
            )
        )
        await _consume_all(broker, topology.job_queue("echo", "normal"), len(messages))
        elapsed = time.perf_counter() - started
        cpu = cpu_accounting.cpu_ms_per_job(before, cpu_accounting.snapshot(), jobs)
    finally:
        await broker.delete_topology()
        await broker.close()
    client, broker_ms = cpu.get(cpu_accounting.LOAD_GENERATOR, 0.0), cpu.get("broker", 0.0)
    return {
        "client_ms": client,
        "broker_ms": broker_ms,
        "total_ms": client + broker_ms,
        "jobs_per_s": jobs / elapsed,
    }


async def _consume_all(broker: Broker, queue_name: str, count: int) -> None:
    """Consume `count` messages, acking PREFETCH / 2 at a time (`multiple`, as a worker settles)."""
    done = asyncio.Event()
    unacked: list[Delivery] = []
    seen = 0

    async def on_message(delivery: Delivery) -> None:
        nonlocal seen
        seen += 1
        unacked.append(delivery)
        if len(unacked) >= PREFETCH // 2 or seen == count:
            batch = unacked[:]
            unacked.clear()
            await ack_all(batch)
        if seen == count:
            done.set()

    consumer = await broker.consume(queue_name, PREFETCH, on_message)
    await asyncio.wait_for(done.wait(), timeout=120)
    await broker.cancel(consumer, close_channel=True)


def _job(n: int) -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input={"n": n},
        callback_url="http://127.0.0.1:9/callbacks",
        submitted_at_ms=int(time.time() * 1000),
    )
