"""The callback express lane on and off, side by side (`task bench -- --only express-lane`).

Each pair starts the local stack twice, `CALLBACK_EXPRESS=1` and `=0` (which goes first
alternates), and runs on each the versus-Celery stage's low load (one echo job every
50 ms to one webhook host, each job's timeline) and an echo x2000 backlog, 64 in flight:
what the lane saves a lone job, and that a backlog, where the lane closes, pays nothing
for it. Figures are medians over the pairs; each pair also gives its own ratios.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.user_path import WARM_UP_JOBS, backlog_run
from bench.versus_celery import _low_load
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess

SIDES = ("1", "0")


async def measure_express_lane(
    amqp_url: str, pairs: int, low_load_jobs: int, backlog_jobs: int
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for pair in range(pairs):
        for side in SIDES if pair % 2 == 0 else SIDES[::-1]:
            run = await _side(amqp_url, side, low_load_jobs, backlog_jobs)
            print(
                f"  CALLBACK_EXPRESS={side}: low load p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.1f}, "
                f"from the outcome {run['outcome_to_callback_ms']:.2f}; echo x{backlog_jobs} "
                f"{run['jobs_per_s']:.0f} jobs/s, lost {run['lost']}, duplicates {run['duplicates']}",
                flush=True,
            )
            runs[side].append(run)
    return {"backlog_jobs": backlog_jobs, "runs": runs, "summary": _summary(runs)}


async def _side(amqp_url: str, express: str, low_load_jobs: int, backlog_jobs: int) -> dict[str, Any]:
    """One stack with the lane on or off: its low load, then its backlog."""
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS="echo", CALLBACK_EXPRESS=express))
    try:
        await stack.start()
        await backlog_run(stack, receiver, "echo", WARM_UP_JOBS)
        low = await _low_load(stack, receiver, low_load_jobs)
        backlog = await backlog_run(stack, receiver, "echo", backlog_jobs)
        received = await receiver.refresh()
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, ("echo",))
    return {
        "p50_ms": low["p50_ms"],
        "p99_ms": low["p99_ms"],
        "accepted_p50_ms": low["accepted_p50_ms"],
        "outcome_to_callback_ms": low["timeline_p50_ms"]["outcome_to_callback"],
        "jobs_per_s": backlog["jobs_per_s"],
        "lost": low["lost"] + backlog["lost"],
        # Over every callback the side's receiver got (warm-up, low load, backlog).
        "duplicates": len(received) - len({record.webhook_id for record in received}),
    }


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    on, off = runs["1"], runs["0"]

    def median_of(side: list[dict[str, Any]], key: str) -> float:
        return statistics.median(float(run[key]) for run in side)

    keys = ("p50_ms", "p99_ms", "accepted_p50_ms", "outcome_to_callback_ms", "jobs_per_s")
    pair_p50_ratios = [a["p50_ms"] / b["p50_ms"] for a, b in zip(on, off, strict=True)]
    return {
        "median_pair_p50_ratio": statistics.median(pair_p50_ratios),
        "on": {key: median_of(on, key) for key in keys},
        "off": {key: median_of(off, key) for key in keys},
        "pair_p50_ratios": pair_p50_ratios,
        "pair_rate_ratios": [a["jobs_per_s"] / b["jobs_per_s"] for a, b in zip(on, off, strict=True)],
        "lost": sum(run["lost"] for run in on + off),
        "duplicates": sum(run["duplicates"] for run in on + off),
    }
