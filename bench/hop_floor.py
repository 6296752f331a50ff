"""What a lone job's hops cost on this box right now, with none of the pipeline's work:
the floor under the low-load figures, measured beside them.

A lone echo job with a callback crosses, in turn: one HTTP leg in (client -> ingress)
and one out (dispatcher -> receiver), about one HTTP exchange together; the broker
once (the job to its worker); and one Redis round trip (the worker records the ending,
and the same script hands the event to the dispatcher: callbacks.express_lane). Without
the lane the event crosses the broker a second time. Its 202 waits for one HTTP
exchange and a persistent publish's confirm. Each is timed here with the clients the
components use (our broker client, our job records, aiohttp), one at a time with a
pause between, as at low load:

    submit -> verified callback >= HTTP exchange + broker one way + Redis round trip
                (through the broker alone: + one more broker one way)
    202                          >= HTTP exchange + publish confirm

What the low-load figures measure above these sums is the pipeline's own work (checks,
encoding, the model's thread, signing, verifying) and the waits between seven processes
on the box's cores. On a shared 2-core box the hops alone move by half from one hour to
the next, so a latency target is only read against the floor of the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from broker.client import Broker, BrokerError, Delivery
from job_records.store import JobRecords
from loadgen.measurement import bench_topology
from wire.outgoing import OutgoingMessage

# The model name of the probe's own queues (declared for the probe, deleted after it).
PROBE_MODEL = "floor-probe"
PROBES = 100
PROBE_INTERVAL_S = 0.02
DELIVERY_WAIT_S = 10.0


async def measure_floor(amqp_url: str, redis_url: str | None, ingress_url: str) -> dict[str, Any]:
    """Medians of each hop and the floors they add up to (ms); Redis's is absent without it."""
    hops = {
        "http_exchange_ms": await _http_exchange_ms(ingress_url),
        **await _broker_hop_ms(amqp_url),
    }
    if redis_url is not None:
        hops["redis_round_trip_ms"] = await _redis_round_trip_ms(redis_url)
    hops["broker_path_floor_ms"] = (
        hops["http_exchange_ms"] + 2 * hops["broker_one_way_ms"] + hops.get("redis_round_trip_ms", 0.0)
    )
    # The express lane needs the job records; without them the event goes by the broker.
    hops["callback_floor_ms"] = hops["broker_path_floor_ms"] - (
        hops["broker_one_way_ms"] if redis_url is not None else 0.0
    )
    hops["accepted_floor_ms"] = hops["http_exchange_ms"] + hops["publish_confirm_ms"]
    return hops


async def _median_ms(probe: Callable[[], Awaitable[object]]) -> float:
    """PROBES calls of `probe`, PROBE_INTERVAL_S apart: the median call, in ms."""
    times = []
    for _ in range(PROBES):
        begun = time.perf_counter()
        await probe()
        times.append((time.perf_counter() - begun) * 1000)
        await asyncio.sleep(PROBE_INTERVAL_S)
    return statistics.median(times)


async def _http_exchange_ms(ingress_url: str) -> float:
    """`GET /healthz` on the ingress over a kept-alive connection, as a client submits."""
    async with aiohttp.ClientSession(ingress_url) as session:

        async def exchange() -> bytes:
            async with session.get("/healthz") as response:
                return await response.read()

        return await _median_ms(exchange)


async def _broker_hop_ms(amqp_url: str) -> dict[str, float]:
    """A persistent message through a durable priority queue of its own, to a consumer
    on another connection: publish -> consumer has it, and publish -> confirm."""
    topology = bench_topology()
    broker = Broker(amqp_url, topology, (PROBE_MODEL,), role="floor-probe")
    await broker.connect()
    one_way: list[float] = []
    confirms: list[float] = []
    arrived = asyncio.Event()
    sent_at = 0.0

    async def on_delivery(delivery: Delivery) -> None:
        one_way.append((time.perf_counter() - sent_at) * 1000)
        await delivery.ack()
        arrived.set()

    try:
        consumer = await broker.consume(topology.job_queue(PROBE_MODEL, "normal"), 1, on_delivery)
        for n in range(PROBES):
            arrived.clear()
            sent_at = time.perf_counter()
            await broker.publish(
                OutgoingMessage(b"{}", message_id=f"floor-{uuid.uuid4().hex}-{n}"),
                topology.job_routing_key(PROBE_MODEL, "normal"),
                exchange=topology.jobs_exchange,
            )
            confirms.append((time.perf_counter() - sent_at) * 1000)
            await asyncio.wait_for(arrived.wait(), DELIVERY_WAIT_S)
            await asyncio.sleep(PROBE_INTERVAL_S)
        await broker.cancel(consumer)
    finally:
        with contextlib.suppress(BrokerError):
            await broker.delete_topology()
        await broker.close()
    return {
        "broker_one_way_ms": statistics.median(one_way),
        "publish_confirm_ms": statistics.median(confirms),
    }


async def _redis_round_trip_ms(redis_url: str) -> float:
    """One read of a record that does not exist: a single command's round trip."""
    records = JobRecords(redis_url, f"floor-probe-{uuid.uuid4().hex[:8]}", ttl_s=60)
    try:
        return await _median_ms(lambda: records.get("absent"))
    finally:
        await records.close()
