"""The user's path: a backlog of jobs to ONE webhook host, first submit to last callback.

Measured as a user drives the platform: the local stack as `task up` runs it (defaults,
local autoscaler on), one callback receiver in its own process that verifies every
signature, N jobs submitted 32 at a time over kept-alive HTTP, and the clock running from
the first submit to the last verified callback. Each model is warmed first with a small
backlog (its replica started and its batch controller ramped up: once per replica), so
the figure is the steady path, not the cold start (`task demo` reports that).

"Path efficiency" is that rate over the worker-alone rate at the same batching (the
worker in this process, the queue prefilled, finished jobs read off the callbacks queue),
measured in the same run.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench import cpu_accounting
from bench.worker_path import SENTENCES, WorkerBench
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology, median
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess
from ray_workers.models.base import Model
from ray_workers.models.echo import EchoModel
from ray_workers.models.minilm import MiniLMModel

MODELS = ("echo", "embed-minilm")
SUBMIT_CONCURRENCY = 32
WARM_UP_JOBS = 200
CALLBACK_WAIT_S = 120.0


def job_input(model: str, n: int) -> Any:
    return {"texts": [SENTENCES[n % len(SENTENCES)]]} if model == "embed-minilm" else {"n": n}


@dataclass(frozen=True)
class Submitted:
    accepted: list[str]
    refused: int
    first_submit_wall_s: float
    last_accepted_wall_s: float


async def submit_backlog(
    base_url: str,
    model: str,
    count: int,
    callback_url: str,
    concurrency: int = SUBMIT_CONCURRENCY,
    batch: int = 1,
) -> Submitted:
    """`count` jobs, `concurrency` requests at a time over kept-alive connections, each
    request one job or (`batch` > 1) a batch of that many."""
    accepted: list[str] = []
    refused = 0
    next_index = 0
    first_submit = time.time()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url, connector=connector) as session:

        async def submitter() -> None:
            nonlocal next_index, refused
            while next_index < count:
                first, next_index = next_index, min(count, next_index + batch)
                jobs = [
                    {"input": job_input(model, n), "callback_url": callback_url}
                    for n in range(first, next_index)
                ]
                path = f"/v1/models/{model}/jobs" + ("" if batch == 1 else "/batch")
                async with session.post(path, json=jobs[0] if batch == 1 else {"jobs": jobs}) as response:
                    if response.status != 202:
                        refused += len(jobs)
                        continue
                    answer = await response.json()
                    accepted.extend([answer["id"]] if batch == 1 else [job["id"] for job in answer["jobs"]])

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return Submitted(accepted, refused, first_submit, time.time())


async def backlog_run(
    stack: StackProcess,
    receiver: ReceiverProcess,
    model: str,
    count: int,
    concurrency: int = SUBMIT_CONCURRENCY,
    batch: int = 1,
) -> dict[str, Any]:
    """One backlog: its rate, 202 span, per-second completion timeline, lost and duplicates."""
    already = len(await receiver.refresh())
    cpu_before = cpu_accounting.snapshot()
    submitted = await submit_backlog(stack.base_url, model, count, receiver.url, concurrency, batch)
    ids = set(submitted.accepted)
    await receiver.wait_for(ids, CALLBACK_WAIT_S)
    cpu_ms = cpu_accounting.cpu_ms_per_job(cpu_before, cpu_accounting.snapshot(), len(ids))
    records = [r for r in receiver.records[already:] if r.job_id in ids]
    per_webhook = Counter(r.webhook_id for r in records)
    done = {r.job_id for r in records}
    last_callback = max((r.received_wall_s for r in records), default=submitted.first_submit_wall_s)
    span_s = last_callback - submitted.first_submit_wall_s
    timeline = _per_second([r.received_wall_s - submitted.first_submit_wall_s for r in records], span_s)
    first_second = next((i for i, n in enumerate(timeline) if n), 0)
    return {
        "model": model,
        "jobs": count,
        "accepted": len(ids),
        "refused": submitted.refused,
        "all_202_s": submitted.last_accepted_wall_s - submitted.first_submit_wall_s,
        "span_s": span_s,
        "jobs_per_s": len(done) / span_s if span_s > 0 else float("nan"),
        "lost": len(ids - done),
        "duplicates": sum(n - 1 for n in per_webhook.values()),
        "unverified": sum(not r.verified for r in records),
        "zero_seconds": sum(1 for n in timeline[first_second:] if n == 0),
        "mean_batch_size": sum(r.batch_size for r in records) / max(1, len(records)),
        "timeline": timeline,
        "cpu_ms_per_job": cpu_ms,
        "cpu_ceiling_jobs_per_s": 1000 * cpu_accounting.cores() / max(1e-9, sum(cpu_ms.values())),
    }


def _per_second(offsets_s: list[float], span_s: float) -> list[int]:
    buckets = [0] * (int(span_s) + 1)
    for offset in offsets_s:
        buckets[min(len(buckets) - 1, max(0, int(offset)))] += 1
    return buckets


async def measure_user_path(amqp_url: str, reps: int, backlogs: list[tuple[str, int]]) -> dict[str, Any]:
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS=",".join(MODELS)))
    runs: dict[str, list[dict[str, Any]]] = {f"{m}-{n}": [] for m, n in backlogs}
    try:
        await stack.start()
        for model in dict.fromkeys(m for m, _ in backlogs):
            warm = await backlog_run(stack, receiver, model, WARM_UP_JOBS)
            if warm["lost"]:
                raise RuntimeError(
                    f"warm-up of {model}: {warm['lost']} jobs got no callback; see {stack.log}"
                )
        for _ in range(reps):
            for model, count in backlogs:
                run = await backlog_run(stack, receiver, model, count)
                print(
                    f"  user path {model} x{count}: {run['jobs_per_s']:.0f} jobs/s, "
                    f"202s in {run['all_202_s']:.2f} s, lost {run['lost']}, dup {run['duplicates']}, "
                    f"zero-seconds {run['zero_seconds']}",
                    flush=True,
                )
                runs[f"{model}-{count}"].append(run)
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, MODELS)
    worker_alone = await _worker_alone(amqp_url, reps, backlogs)
    summary = {}
    for name, rs in runs.items():
        model = name.rsplit("-", 1)[0]
        rate = median([r["jobs_per_s"] for r in rs])
        summary[name] = {
            "jobs_per_s": rate,
            "worker_alone_jobs_per_s": worker_alone[model],
            "path_efficiency": rate / worker_alone[model],
            "lost": sum(r["lost"] for r in rs),
            "duplicates": sum(r["duplicates"] for r in rs),
            "zero_seconds_max": max(r["zero_seconds"] for r in rs),
            "cpu_ceiling_jobs_per_s": median([r["cpu_ceiling_jobs_per_s"] for r in rs]),
        }
    return {"runs": runs, "worker_alone": worker_alone, "summary": summary}


async def _worker_alone(amqp_url: str, reps: int, backlogs: list[tuple[str, int]]) -> dict[str, float]:
    """Jobs/s of one JobWorker with the stack's default batching, queue prefilled."""
    rates: dict[str, float] = {}
    models: dict[str, Model] = {"echo": EchoModel(), "embed-minilm": MiniLMModel()}
    for model_name in dict.fromkeys(m for m, _ in backlogs):
        count = max(n for m, n in backlogs if m == model_name)
        async with WorkerBench(amqp_url, models[model_name]) as bench:
            text = job_input(model_name, 0)
            await bench.throughput(bench.settings, min(count, WARM_UP_JOBS), text)
            rates[model_name] = median(
                [(await bench.throughput(bench.settings, count, text))["jobs_per_s"] for _ in range(reps)]
            )
    return rates
