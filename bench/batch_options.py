"""The two ways a batch could travel, measured on the message path alone.

- `per-job messages` (what the ingress does): each job of a batch is its own persistent
  message, all published pipelined with one wait for the confirms, and consumed and
  acked one by one (acks `multiple`, as the worker settles a batch).
- `chunk messages` (the option not taken): CHUNK_JOBS jobs per message, which a worker
  would split.

Both publish the same jobs, confirmed, to a durable priority queue like a model's, then
consume and ack all of them; the figure is the CPU per job of this process (the client
side of the ingress and the worker together) and of the broker. What a chunk saves is
the per-message cost; what it would cost is in the docs (queue length counts messages).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika

from bench import cpu_accounting
from loadgen.measurement import median
from wire.envelope import Job
from wire.job_message import job_message

CHUNK_JOBS = 32
PREFETCH = 256


async def measure_batch_options(amqp_url: str, reps: int, jobs: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"per-job messages": [], "chunk messages": []}
    connection = await aio_pika.connect(amqp_url)
    try:
        for _ in range(reps):
            for option, per_message in (("per-job messages", 1), ("chunk messages", CHUNK_JOBS)):
                runs[option].append(await _one_run(connection, jobs, per_message))
    finally:
        await connection.close()
    summary = {
        option: {
            part: median([run[part] for run in option_runs])
            for part in ("client_ms", "broker_ms", "total_ms")
        }
        for option, option_runs in runs.items()
    }
    saved = summary["per-job messages"]["total_ms"] - summary["chunk messages"]["total_ms"]
    return {"runs": runs, "summary": summary, "chunk_jobs": CHUNK_JOBS, "saved_ms_per_job": saved}


async def _one_run(
    connection: aio_pika.abc.AbstractConnection, jobs: int, per_message: int
) -> dict[str, float]:
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(
        f"bench-options-{uuid.uuid4().hex[:8]}", durable=True, arguments={"x-max-priority": 2}
    )
    bodies = [job_message(_job(n)).body for n in range(jobs)]
    messages = [
        b'{"schema_version":1,"jobs":[' + b",".join(bodies[first : first + per_message]) + b"]}"
        if per_message > 1
        else bodies[first]
        for first in range(0, jobs, per_message)
    ]
    before = cpu_accounting.snapshot()
    started = time.perf_counter()
    await asyncio.gather(
        *(
            channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, priority=1), queue.name
            )
            for body in messages
        )
    )
    await _consume_all(connection, queue.name, len(messages))
    elapsed = time.perf_counter() - started
    cpu = cpu_accounting.cpu_ms_per_job(before, cpu_accounting.snapshot(), jobs)
    await queue.delete(if_unused=False, if_empty=False)
    await channel.close()
    client, broker = cpu.get(cpu_accounting.LOAD_GENERATOR, 0.0), cpu.get("broker", 0.0)
    return {
        "client_ms": client,
        "broker_ms": broker,
        "total_ms": client + broker,
        "jobs_per_s": jobs / elapsed,
    }


async def _consume_all(connection: aio_pika.abc.AbstractConnection, queue_name: str, count: int) -> None:
    """Consume `count` messages, acking every PREFETCH / 2 with `multiple`, as a worker settles."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    queue = await channel.get_queue(queue_name)
    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        seen += 1
        if seen % (PREFETCH // 2) == 0 or seen == count:
            await message.ack(multiple=True)
        if seen == count:
            done.set()

    tag = await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), timeout=120)
    await queue.cancel(tag)
    await channel.close()


def _job(n: int) -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input={"n": n},
        callback_url="http://127.0.0.1:9/callbacks",
        submitted_at_ms=int(time.time() * 1000),
    )
