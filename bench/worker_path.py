"""Worker-side benchmarks on the real broker, the model in process: batching gain,
controller quality, and priority isolation. Jobs go straight onto the queue and
finished jobs are read off the callbacks queue, so only the worker path is measured."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import msgspec

from broker.client import Broker
from loadgen.measurement import (
    Finished,
    FinishedJobs,
    bench_topology,
    make_job,
    median,
    open_loop,
    percentile,
    publish_jobs,
)
from model_catalogue.sections import Batching
from ray_workers.job_worker import JobWorker
from ray_workers.models.base import Model
from ray_workers.models.echo import EchoModel
from ray_workers.models.minilm import MiniLMModel
from ray_workers.settings import WorkerSettings
from wire.envelope import Job
from wire.topology import QUEUE_TYPES, QueueType

FINISH_TIMEOUT_S = 300.0
WARM_UP_FRACTION = 0.3
SENTENCES = [
    "The cat sits on the mat.",
    "Queues decouple producers from consumers.",
    "GPUs idle cost money.",
    "A kitten rests on a rug.",
    "Stock markets fell sharply today.",
    "Batching raises throughput.",
]


def steady_state(done: list[Finished]) -> dict[str, float]:
    """Jobs/s, batch p95 and mean batch over the finished jobs less the first
    WARM_UP_FRACTION, the same for every variant, so that a controller's ramp-up (a
    once-per-replica cost) and the worker's start do not count."""
    done = sorted(done, key=lambda d: d.done_s)
    steady = done[int(len(done) * WARM_UP_FRACTION) :]
    span_s = steady[-1].done_s - steady[0].done_s
    if span_s <= 0:
        raise RuntimeError(f"{len(done)} jobs are too few to measure: the steady part ran as one batch")
    return {
        "jobs_per_s": (len(steady) - 1) / span_s,
        "batch_latency_p95_ms": percentile([d.inference_ms for d in steady], 95),
        "mean_batch_size": sum(d.batch_size for d in steady) / len(steady),
    }


class WorkerBench:
    """One bench topology, one broker connection, and a collector of finished jobs."""

    def __init__(self, amqp_url: str, model: Model, queue_type: QueueType = "classic") -> None:
        self.model = model
        self.settings = WorkerSettings(
            amqp_url=amqp_url,
            models=(model.name,),
            topology=bench_topology(queue_type),
        )
        self.broker = Broker(amqp_url, self.settings.topology, (model.name,))
        self.finished = FinishedJobs(self.broker)

    async def __aenter__(self) -> WorkerBench:
        await self.broker.connect()
        await self.finished.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.broker.delete_topology()
        await self.broker.close()

    def jobs(self, count: int, job_input: Any, priority: str = "normal") -> list[Job]:
        return [make_job(self.model.name, job_input, priority) for _ in range(count)]  # type: ignore[arg-type]

    async def throughput(self, settings: WorkerSettings, count: int, job_input: Any) -> dict[str, float]:
        """Steady-state jobs/s with the queue kept full: all jobs are queued first, then the
        worker starts."""
        jobs = self.jobs(count, job_input)
        await publish_jobs(self.broker, jobs)
        worker = JobWorker(self.model, settings)
        await worker.start()
        try:
            done = await self.finished.wait_for({j.id for j in jobs}, FINISH_TIMEOUT_S)
        finally:
            await worker.stop()
        return {**steady_state(done), "final_batch_size": worker.batching.size}

    async def low_load_latency(
        self, settings: WorkerSettings, rate: float, count: int, job_input: Any
    ) -> float:
        """p50 seconds from submission to the worker finishing, at a low open-loop rate."""
        worker = JobWorker(self.model, settings)
        await worker.start()
        jobs = self.jobs(count, job_input)
        try:
            await open_loop(rate, count, lambda i: self.submit_now(jobs, i))
            done = await self.finished.wait_for({j.id for j in jobs}, FINISH_TIMEOUT_S)
        finally:
            await worker.stop()
        submitted = {j.id: j.submitted_at_ms / 1000 for j in jobs}
        return percentile([d.done_s - submitted[d.job_id] for d in done], 50)

    async def submit_now(self, jobs: list[Job], index: int) -> None:
        jobs[index] = msgspec.structs.replace(jobs[index], submitted_at_ms=int(time.time() * 1000))
        await publish_jobs(self.broker, [jobs[index]])


async def measure_batching(
    amqp_url: str, model: Model, reps: int, count: int, sweep: list[int], latency_target_s: float
) -> dict[str, Any]:
    """Adaptive vs batch size 1 (gain), vs the best fixed size under the target (quality),
    and low-load latency adaptive vs batch size 1."""
    async with WorkerBench(amqp_url, model) as bench:
        base = replace(
            bench.settings, batching=Batching(max_size=max(sweep), latency_target_ms=latency_target_s * 1000)
        )
        adaptive = base
        size_one = replace(base, batching=base.batching.model_copy(update={"adaptive": False, "max_size": 1}))
        text = {"texts": [SENTENCES[0]]}
        await bench.throughput(adaptive, min(count, 200), text)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {"adaptive": [], "fixed-1": []}
        for size in sweep:
            runs[f"fixed-{size}"] = []
        for _ in range(reps):
            runs["adaptive"].append(await bench.throughput(adaptive, count, text))
            runs["fixed-1"].append(await bench.throughput(size_one, max(count // 4, 50), text))
            for size in sweep:
                fixed = replace(
                    base, batching=base.batching.model_copy(update={"adaptive": False, "max_size": size})
                )
                runs[f"fixed-{size}"].append(await bench.throughput(fixed, count, text))
        low_adaptive = [await bench.low_load_latency(adaptive, 10, 30, text) for _ in range(reps)]
        low_one = [await bench.low_load_latency(size_one, 10, 30, text) for _ in range(reps)]
    summary = {
        name: {
            "jobs_per_s": median([r["jobs_per_s"] for r in rs]),
            "batch_latency_p95_ms": median([r["batch_latency_p95_ms"] for r in rs]),
            "mean_batch_size": median([r["mean_batch_size"] for r in rs]),
        }
        for name, rs in runs.items()
    }
    eligible = {
        name: s
        for name, s in summary.items()
        if name.startswith("fixed-") and s["batch_latency_p95_ms"] <= latency_target_s * 1000
    }
    best_name = max(eligible, key=lambda name: eligible[name]["jobs_per_s"]) if eligible else "fixed-1"
    return {
        "model": model.name,
        "jobs_per_run": count,
        "latency_target_ms": latency_target_s * 1000,
        "runs": runs,
        "summary": summary,
        "best_fixed": best_name,
        "gain_vs_batch_1": summary["adaptive"]["jobs_per_s"] / summary["fixed-1"]["jobs_per_s"],
        "adaptive_vs_best_fixed": summary["adaptive"]["jobs_per_s"] / summary[best_name]["jobs_per_s"],
        "low_load_p50_ms": {"adaptive": median(low_adaptive) * 1000, "fixed-1": median(low_one) * 1000},
        "low_load_latency_ratio": median(low_adaptive) / median(low_one),
    }


async def measure_priority(
    amqp_url: str, model: Model, reps: int, flood: int, high: int, queue_type: QueueType = "classic"
) -> dict[str, Any]:
    """p99 of high-priority jobs while a flood of low ones saturates the worker, vs no flood."""
    async with WorkerBench(amqp_url, model, queue_type) as bench:
        settings = replace(bench.settings, batching=Batching(adaptive=False, max_size=8))
        job_input = {"sleep_ms": 20}
        with_flood, without = [], []
        for _ in range(reps):
            without.append(await _high_p99(bench, settings, 0, high, job_input))
            with_flood.append(await _high_p99(bench, settings, flood, high, job_input))
    return {
        "batch_size": 8,
        "batch_ms": 20,
        "flood_jobs": flood,
        "high_jobs": high,
        "high_p99_ms_no_flood": median(without) * 1000,
        "high_p99_ms_flood": median(with_flood) * 1000,
        "ratio": median(with_flood) / median(without),
    }


async def measure_queue_types(amqp_url: str, reps: int, backlogs: dict[str, int]) -> dict[str, Any]:
    """Worker-alone jobs/s on the quorum topology and the classic one, per model, the same
    run: what replication costs (every message written to a Raft log) on this box."""
    models: dict[str, Model] = {"echo": EchoModel(), "embed-minilm": MiniLMModel()}
    rates: dict[str, dict[str, float]] = {}
    for name, count in backlogs.items():
        rates[name] = {}
        for queue_type in QUEUE_TYPES:
            async with WorkerBench(amqp_url, models[name], queue_type) as bench:
                job_input = {"texts": [SENTENCES[0]]} if name == "embed-minilm" else {"n": 1}
                await bench.throughput(bench.settings, min(count, 200), job_input)  # warm-up
                runs = [await bench.throughput(bench.settings, count, job_input) for _ in range(reps)]
                rates[name][queue_type] = median([run["jobs_per_s"] for run in runs])
    return {name: {**r, "ratio": r["quorum"] / r["classic"]} for name, r in rates.items()}


async def _high_p99(
    bench: WorkerBench, settings: WorkerSettings, flood: int, count: int, job_input: Any
) -> float:
    low = bench.jobs(flood, job_input, "low")
    await publish_jobs(bench.broker, low)
    worker = JobWorker(bench.model, settings)
    await worker.start()
    high = bench.jobs(count, job_input, "high")
    try:
        await open_loop(10, count, lambda i: bench.submit_now(high, i))
        done = await bench.finished.wait_for({j.id for j in high}, FINISH_TIMEOUT_S)
        await bench.finished.wait_for({j.id for j in low}, FINISH_TIMEOUT_S)
    finally:
        await worker.stop()
    submitted = {j.id: j.submitted_at_ms / 1000 for j in high}
    return percentile([d.done_s - submitted[d.job_id] for d in done], 99)
