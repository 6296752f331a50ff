"""What the benchmarks share: open-loop arrivals, percentiles, a bench topology, and a
collector of finished jobs read straight off the callbacks queue."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.client import Broker, Delivery
from job_records.store import JobRecords
from settings.environment import Environment
from wire.envelope import Job, Priority, decode_callback_deliveries
from wire.job_message import job_message
from wire.topology import QueueType, Topology

PUBLISH_WINDOW = 256


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_topology(queue_type: QueueType = "classic") -> Topology:
    return Topology(prefix=f"bench-{uuid.uuid4().hex[:8]}.", queue_type=queue_type)


def bench_stack_env(amqp_url: str, topology: Topology, secret: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's local stack: its own queues, callbacks to loopback."""
    return {
        **os.environ,
        "AMQP_URL": amqp_url,
        "QUEUE_PREFIX": topology.prefix,
        "WEBHOOK_SECRET": secret,
        "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
        **extra,
    }


async def delete_bench_topology(amqp_url: str, topology: Topology, models: tuple[str, ...]) -> None:
    """Delete a run's queues and exchanges, and the job records its stack wrote (REDIS_URL)."""
    cleanup = Broker(amqp_url, topology, models)
    await cleanup.connect()
    await cleanup.delete_topology()
    await cleanup.close()
    records_url = Environment.read(os.environ).records_url
    if records_url is not None:
        await forget_records(records_url, topology.prefix)


async def forget_records(redis_url: str, prefix: str) -> None:
    """Delete a benchmark's job records and counters."""
    records = JobRecords(redis_url, prefix, ttl_s=60)
    try:
        await records.delete_all()
    finally:
        await records.close()


async def open_loop(rate_per_s: float, count: int, fire: Callable[[int], Coroutine[Any, Any, None]]) -> None:
    """Start `fire(i)` on a fixed schedule, whatever earlier calls take (open loop)."""
    started = time.monotonic()
    tasks = []
    for i in range(count):
        delay_s = started + i / rate_per_s - time.monotonic()
        if delay_s > 0:
            await asyncio.sleep(delay_s)  # the arrival schedule itself
        tasks.append(asyncio.create_task(fire(i)))
    await asyncio.gather(*tasks)


def make_job(model: str, job_input: Any, priority: Priority = "normal") -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model=model,
        input=job_input,
        callback_url="http://127.0.0.1:9/",
        priority=priority,
        submitted_at_ms=int(time.time() * 1000),
    )


async def publish_jobs(broker: Broker, jobs: Sequence[Job]) -> None:
    """Pipelined publishes with confirms, straight onto the jobs exchange."""
    topology = broker.topology
    for start in range(0, len(jobs), PUBLISH_WINDOW):
        await asyncio.gather(
            *(
                broker.publish(
                    job_message(job),
                    topology.job_routing_key(job.model, job.priority),
                    exchange=topology.jobs_exchange,
                )
                for job in jobs[start : start + PUBLISH_WINDOW]
            )
        )


@dataclass(frozen=True)
class Finished:
    job_id: str
    done_s: float  # wall clock when the worker finished it (the event's timestamp)
    inference_ms: float
    batch_size: int


class FinishedJobs:
    """Consumes the callbacks queue (no HTTP delivery) to see what the workers finished."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.finished: dict[str, Finished] = {}
        self._changed = asyncio.Event()

    async def start(self) -> None:
        topology = self._broker.topology
        await self._broker.consume(
            topology.callbacks_queue, 1000, self._on_delivery, replicated=topology.replicated
        )

    async def _on_delivery(self, delivery: Delivery) -> None:
        for callback in decode_callback_deliveries(delivery.body, delivery.type):
            event, data = callback.event, callback.event.data
            done_s = datetime.fromisoformat(event.timestamp).timestamp()
            self.finished[data.id] = Finished(
                data.id, done_s, data.timings.inference_ms, data.timings.batch_size
            )
        await delivery.ack()
        self._changed.set()

    async def wait_for(self, ids: set[str], timeout_s: float) -> list[Finished]:
        deadline = time.monotonic() + timeout_s
        while not ids <= self.finished.keys():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise TimeoutError(f"{len(ids - self.finished.keys())} of {len(ids)} jobs unfinished")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining_s)
            except TimeoutError:
                continue
        return [self.finished[job_id] for job_id in ids]
