"""Two tenants on one model: how long the small one waits behind the large one's backlog.

Tenant A submits A_JOBS embed-minilm jobs, 64 in flight; once half are accepted, tenant
B submits B_JOBS single jobs B_INTERVAL_S apart. The figures: B's submit -> verified
callback (p50, max) and A's throughput, beside A alone in the same run, with the
shipped TENANT_LANES (each tenant's jobs in a lane of their own, served in turn). Then,
in the same run, once with TENANT_LANES=1: every tenant's jobs in one FIFO, as before
lanes, where B waits behind what A queued before it.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from typing import Any

import aiohttp

from bench.user_path import job_input
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology, median
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess

MODEL = "embed-minilm"
A_IN_FLIGHT = 64
B_INTERVAL_S = 0.1
CALLBACK_WAIT_S = 300.0


async def measure_tenant_share(amqp_url: str, reps: int, a_jobs: int, b_jobs: int) -> dict[str, Any]:
    """With lanes, medians of `reps`; and one run with one lane, for comparison."""
    lanes = await _share(amqp_url, reps, a_jobs, b_jobs, {})
    one_lane = await _share(amqp_url, 1, a_jobs, b_jobs, {"TENANT_LANES": "1"})
    return {**lanes, "one_lane": one_lane}


async def _share(amqp_url: str, reps: int, a_jobs: int, b_jobs: int, env: dict[str, str]) -> dict[str, Any]:
    key_a, key_b = secrets.token_hex(16), secrets.token_hex(16)
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(
        bench_stack_env(amqp_url, topology, secret, MODELS=MODEL, API_KEYS=f"{key_a},{key_b}", **env)
    )
    runs: list[dict[str, Any]] = []
    try:
        await stack.start()
        await _tenant_a(stack.base_url, receiver, key_a, 200, None)  # warm: replica up, batches ramped
        for _ in range(reps):
            alone = await _tenant_a(stack.base_url, receiver, key_a, a_jobs, None)
            shared = await _tenant_a(stack.base_url, receiver, key_a, a_jobs, key_b, b_jobs)
            run = {
                "a_alone_jobs_per_s": alone["jobs_per_s"],
                "a_shared_jobs_per_s": shared["jobs_per_s"],
                "b_p50_s": shared["b_p50_s"],
                "b_max_s": shared["b_max_s"],
                "lost": alone["lost"] + shared["lost"],
                "duplicates": alone["duplicates"] + shared["duplicates"],
            }
            print(
                f"  tenant share{' ' + str(env) if env else ''}: B p50 {run['b_p50_s']:.2f} s, max "
                f"{run['b_max_s']:.2f} s; A {run['a_shared_jobs_per_s']:.0f} jobs/s beside B, "
                f"{run['a_alone_jobs_per_s']:.0f} alone; lost {run['lost']}, duplicates {run['duplicates']}",
                flush=True,
            )
            runs.append(run)
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, (MODEL,))
    return {
        "runs": runs,
        "b_p50_s": median([run["b_p50_s"] for run in runs]),
        "b_max_s": median([run["b_max_s"] for run in runs]),
        "a_ratio": median([run["a_shared_jobs_per_s"] / run["a_alone_jobs_per_s"] for run in runs]),
        "lost": sum(run["lost"] for run in runs),
        "duplicates": sum(run["duplicates"] for run in runs),
    }


async def _tenant_a(
    base_url: str, receiver: ReceiverProcess, key_a: str, a_jobs: int, key_b: str | None, b_jobs: int = 0
) -> dict[str, Any]:
    """A's backlog, and B's trickle once half of A's is accepted; each job's submit time."""
    submitted: dict[str, tuple[str, float]] = {}  # id -> (tenant, wall submit)
    half_accepted = asyncio.Event()
    started = time.time()
    async with aiohttp.ClientSession(base_url) as session:

        async def post(key: str, tenant: str, n: int) -> None:
            at = time.time()
            body = {"input": job_input(MODEL, n), "callback_url": receiver.url}
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"/v1/models/{MODEL}/jobs", json=body, headers=headers) as response:
                if response.status == 202:
                    submitted[(await response.json())["id"]] = (tenant, at)
            if tenant == "a" and sum(1 for t, _ in submitted.values() if t == "a") >= a_jobs // 2:
                half_accepted.set()

        async def tenant_a() -> None:
            pending = iter(range(a_jobs))

            async def submitter() -> None:
                for n in pending:
                    await post(key_a, "a", n)

            await asyncio.gather(*(submitter() for _ in range(A_IN_FLIGHT)))

        async def tenant_b() -> None:
            if key_b is None:
                return
            await half_accepted.wait()
            for n in range(b_jobs):
                await post(key_b, "b", n)
                await asyncio.sleep(B_INTERVAL_S)

        await asyncio.gather(tenant_a(), tenant_b())
    await receiver.wait_for(set(submitted), CALLBACK_WAIT_S)
    ours = [r for r in receiver.records if r.job_id in submitted]
    arrived = {r.job_id: r.received_wall_s for r in ours}
    a_done = [arrived[i] for i, (tenant, _) in submitted.items() if tenant == "a" and i in arrived]
    b_waits = [arrived[i] - at for i, (tenant, at) in submitted.items() if tenant == "b" and i in arrived]
    return {
        "jobs_per_s": len(a_done) / (max(a_done) - started) if a_done else float("nan"),
        "b_p50_s": statistics.median(b_waits) if b_waits else float("nan"),
        "b_max_s": max(b_waits, default=float("nan")),
        "lost": len(set(submitted) - set(arrived)),
        "duplicates": len(ours) - len(arrived),
    }
