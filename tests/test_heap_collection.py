"""A running ingress takes a backlog of batches without a full collection of its heap
(policies.heap_collection): before its start-up heap was frozen, each one held the event
loop for 60-210 ms, several times a backlog."""

from __future__ import annotations

import asyncio
import os
import re

import httpx

from loadgen.stack_process import start_ingress
from wire.topology import Topology

BATCHES = 8
JOBS_PER_BATCH = 1000
FULL_COLLECTIONS = re.compile(r'^python_gc_collections_total\{generation="2"\} (\S+)$', re.MULTILINE)


async def _full_collections(client: httpx.AsyncClient) -> float:
    metrics = (await client.get("/metrics")).text
    found = FULL_COLLECTIONS.search(metrics)
    if found is None:
        raise AssertionError("the ingress's /metrics has no python_gc_collections_total for generation 2")
    return float(found[1])


async def test_an_ingress_takes_a_backlog_of_batches_without_a_full_collection(
    amqp_url: str, redis_url: str, topology: Topology
) -> None:
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "QUEUE_PREFIX": topology.prefix,
        "MODELS": "echo",
        "MAX_QUEUE_LENGTH": str(2 * BATCHES * JOBS_PER_BATCH),
    }
    ingress, base_url = await start_ingress(env)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            before = await _full_collections(client)
            batch = {"jobs": [{"input": {"n": n}} for n in range(JOBS_PER_BATCH)]}
            answers = await asyncio.gather(
                *(client.post("/v1/models/echo/jobs/batch", json=batch) for _ in range(BATCHES))
            )
            after = await _full_collections(client)
    finally:
        ingress.terminate()
        await ingress.wait()

    assert [answer.status_code for answer in answers] == [202] * BATCHES
    assert after == before
