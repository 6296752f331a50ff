"""A rate-limited tenant through two ingress processes: does the limit hold across them?

Two `python -m ingress` processes share one Redis; one tenant limited to RATE_PER_S jobs/s
with a bucket of BURST submits back to back through both (CLIENTS_PER_INGRESS requests in
flight at each) for the run's duration. The figure is the jobs accepted over what the
bucket allows, `burst + rate x elapsed`; every refusal must be a 429 carrying
`Retry-After`, `RateLimit` and `RateLimit-Policy`. Each repetition is a fresh tenant, so
each starts with a full bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from loadgen.measurement import bench_topology, delete_bench_topology, median
from loadgen.stack_process import start_ingress
from wire.topology import Topology

RATE_PER_S = 20
BURST = 20
CLIENTS_PER_INGRESS = 4


async def measure_tenant_limits(
    amqp_url: str, redis_url: str, reps: int, duration_s: float
) -> dict[str, Any]:
    keys = [secrets.token_hex(16) for _ in range(reps)]
    topology = bench_topology()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as folder:
        tenants_file = Path(folder) / "tenants.yaml"
        tenants_file.write_text(
            "tenants:\n"
            + "".join(
                f"  - {{name: bench-{n}, key: {key}, rate_per_s: {RATE_PER_S}, burst: {BURST}}}\n"
                for n, key in enumerate(keys)
            )
        )
        try:
            async with _ingresses(amqp_url, redis_url, topology, tenants_file, 2) as urls:
                for key in keys:
                    runs.append(await _run(urls, key, duration_s))
                    run = runs[-1]
                    print(
                        f"  tenant limits: {run['accepted']} accepted of {run['allowed']:.0f} allowed "
                        f"({run['ratio']:.3f}), refusals {run['refusals']}",
                        flush=True,
                    )
        finally:
            await delete_bench_topology(amqp_url, topology, ("echo",))
    return {
        "rate_per_s": RATE_PER_S,
        "burst": BURST,
        "duration_s": duration_s,
        "runs": runs,
        "ratio": median([run["ratio"] for run in runs]),
        "refusals_without_headers": sum(run["refusals_without_headers"] for run in runs),
    }


async def _run(urls: list[str], key: str, duration_s: float) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    bare_refusals = 0
    headers = {"Authorization": f"Bearer {key}"}
    started = time.monotonic()
    deadline = started + duration_s

    async def client(session: aiohttp.ClientSession, url: str) -> None:
        nonlocal bare_refusals
        while time.monotonic() < deadline:
            async with session.post(
                f"{url}/v1/models/echo/jobs", json={"input": 1}, headers=headers
            ) as response:
                await response.read()
                statuses[response.status] += 1
                wanted = ("retry-after", "ratelimit", "ratelimit-policy")
                if response.status == 429 and not all(name in response.headers for name in wanted):
                    bare_refusals += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session, url) for url in urls for _ in range(CLIENTS_PER_INGRESS)))
    elapsed_s = time.monotonic() - started
    allowed = BURST + RATE_PER_S * elapsed_s
    return {
        "accepted": statuses[202],
        "allowed": allowed,
        "ratio": statuses[202] / allowed,
        "elapsed_s": elapsed_s,
        "refusals": statuses[429],
        "other": {str(code): n for code, n in statuses.items() if code not in (202, 429)},
        "refusals_without_headers": bare_refusals,
    }


@contextlib.asynccontextmanager
async def _ingresses(
    amqp_url: str, redis_url: str, topology: Topology, tenants_file: Path, count: int
) -> AsyncIterator[list[str]]:
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "REDIS_URL": redis_url,
        "QUEUE_PREFIX": topology.prefix,
        "MODELS": "echo",
        "TENANTS_FILE": str(tenants_file),
    }
    processes: list[asyncio.subprocess.Process] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            process, url = await start_ingress(env)
            processes.append(process)
            urls.append(url)
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await asyncio.wait_for(process.wait(), timeout=30)
