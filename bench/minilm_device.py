"""embed-minilm on the device the model picks (CUDA where a GPU is visible, else the CPU):
the model alone at the worker's batch sizes, against the same model fed by the message path
(the real broker, a JobWorker in this process, finished jobs read off the callbacks queue).

On a GPU the model embeds tens of thousands of sentences a second, so what a user gets is
set by what feeds it: this stage says how far apart the two are, for one-text jobs and for
jobs that carry many texts. Runs alone as `python -m bench.minilm_device` on a GPU machine
that has the broker but not the rest of the bench's tools."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.worker_path import FINISH_TIMEOUT_S, SENTENCES, WorkerBench, steady_state
from loadgen.measurement import median, publish_jobs
from model_catalogue.catalogue import load_catalogue
from model_catalogue.sections import Batching
from ray_workers.job_worker import JobWorker
from ray_workers.models.cuda import device_name
from ray_workers.models.minilm import MiniLMModel
from ray_workers.settings import WorkerSettings
from settings.environment import DEFAULT_AMQP_URL

MODEL_ALONE_BATCHES = (1, 32, 128, 256)
MODEL_ALONE_SECONDS = 2.0
REPLICA_START_TIMEOUT_S = 120.0
# Cosine similarity the picked device's embeddings keep with the CPU's, same weights.
AGREEMENT_FLOOR = 0.999


def _texts(count: int) -> list[str]:
    """The same sentence throughout, so that every path pads to the same length."""
    return [SENTENCES[1]] * count


def _model_alone(model: MiniLMModel, batch: int) -> dict[str, float]:
    """Sentences/s of `predict` on `batch` one-text jobs, the call the worker makes,
    tokenising and copying the vectors back included; repeated for MODEL_ALONE_SECONDS."""
    inputs = [[text] for text in _texts(batch)]
    model.predict(inputs)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < MODEL_ALONE_SECONDS:
        model.predict(inputs)
        calls += 1
    elapsed = time.perf_counter() - started
    return {"sentences_per_s": calls * batch / elapsed, "ms_per_batch": elapsed / calls * 1000}


def _agreement(model: MiniLMModel) -> float:
    """Smallest cosine similarity between this device's embeddings and the CPU's."""
    if model.device == "cpu":
        return 1.0
    texts = list(SENTENCES)
    here, cpu = model.embed(texts), MiniLMModel("cpu").embed(texts)
    return min(sum(a * b for a, b in zip(u, v, strict=True)) for u, v in zip(here, cpu, strict=True))


async def _worker_path(
    amqp_url: str, model: MiniLMModel, reps: int, count: int, texts_per_job: int
) -> dict[str, float]:
    batching = load_catalogue().entry("embed-minilm").batching
    job_input = {"texts": _texts(texts_per_job)}
    runs = []
    async with WorkerBench(amqp_url, model) as bench:
        settings = replace(bench.settings, batching=batching)
        await bench.throughput(settings, min(count, 500), job_input)  # warm-up
        for _ in range(reps):
            cpu_before, wall_before = time.process_time(), time.perf_counter()
            run = await bench.throughput(settings, count, job_input)
            run["process_cpu_ms_per_job"] = (time.process_time() - cpu_before) / count * 1000
            run["wall_s"] = time.perf_counter() - wall_before
            runs.append(run)
    jobs_per_s = median([r["jobs_per_s"] for r in runs])
    return {
        "texts_per_job": texts_per_job,
        "jobs": count,
        "jobs_per_s": jobs_per_s,
        "sentences_per_s": jobs_per_s * texts_per_job,
        "mean_batch_size": median([r["mean_batch_size"] for r in runs]),
        "batch_latency_p95_ms": median([r["batch_latency_p95_ms"] for r in runs]),
        "process_cpu_ms_per_job": median([r["process_cpu_ms_per_job"] for r in runs]),
    }


def _replica(settings: WorkerSettings, ready: Any, go: Any, stop: Any) -> None:
    """One worker replica in a process of its own, as Ray runs each Serve replica: loads
    the model, says so, and consumes from `go` until `stop`."""

    async def serve() -> None:
        worker = JobWorker(MiniLMModel(), settings)
        ready.set()
        await asyncio.to_thread(go.wait)
        await worker.start()
        await asyncio.to_thread(stop.wait)
        await worker.stop()

    asyncio.run(serve())


async def _replicas_throughput(
    bench: WorkerBench, batching: Batching, replicas: int, count: int
) -> dict[str, float]:
    """Jobs/s of `replicas` processes sharing the device, each a whole worker (its own
    event loop and GIL), draining one backlog of one-text jobs queued before they start."""
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be forked once initialised
    settings = replace(bench.settings, batching=batching)
    ready: list[multiprocessing.synchronize.Event] = [spawn.Event() for _ in range(replicas)]
    go, stop = spawn.Event(), spawn.Event()
    processes = [spawn.Process(target=_replica, args=(settings, r, go, stop)) for r in ready]
    for process in processes:
        process.start()
    try:
        for event in ready:
            if not await asyncio.to_thread(event.wait, REPLICA_START_TIMEOUT_S):
                raise RuntimeError(f"a replica did not load the model in {REPLICA_START_TIMEOUT_S} s")
        jobs = bench.jobs(count, {"texts": _texts(1)})
        await publish_jobs(bench.broker, jobs)
        go.set()
        done = await bench.finished.wait_for({j.id for j in jobs}, FINISH_TIMEOUT_S)
    finally:
        stop.set()
        for process in processes:
            await asyncio.to_thread(process.join, 60)
            if process.is_alive():
                process.kill()
    return steady_state(done)


async def _replicas(
    amqp_url: str, model: MiniLMModel, reps: int, count: int, replica_counts: tuple[int, ...]
) -> dict[str, Any]:
    batching = load_catalogue().entry("embed-minilm").batching
    async with WorkerBench(amqp_url, model) as bench:
        runs: dict[str, list[dict[str, float]]] = {str(n): [] for n in replica_counts}
        for _ in range(reps):
            for n in replica_counts:
                runs[str(n)].append(await _replicas_throughput(bench, batching, n, count))
    return {
        n: {
            "jobs_per_s": median([r["jobs_per_s"] for r in rs]),
            "mean_batch_size": median([r["mean_batch_size"] for r in rs]),
            "batch_latency_p95_ms": median([r["batch_latency_p95_ms"] for r in rs]),
        }
        for n, rs in runs.items()
    }


async def measure_minilm_device(
    amqp_url: str, reps: int, single_jobs: int, multi_jobs: int, replica_counts: tuple[int, ...]
) -> dict[str, Any]:
    """The model alone; the worker path with one-text jobs and with 32-text jobs; then
    several replicas sharing the device, each in its own process."""
    model = MiniLMModel()
    alone = {str(batch): _model_alone(model, batch) for batch in MODEL_ALONE_BATCHES}
    best_alone = max(result["sentences_per_s"] for result in alone.values())
    single = await _worker_path(amqp_url, model, reps, single_jobs, 1)
    multi = await _worker_path(amqp_url, model, reps, multi_jobs, 32)
    replicas = await _replicas(amqp_url, model, reps, single_jobs, replica_counts)
    agreement = _agreement(model)
    if agreement < AGREEMENT_FLOOR:
        raise RuntimeError(f"{model.device} embeddings disagree with the CPU's: cosine {agreement:.5f}")
    return {
        "device": model.device,
        "device_name": device_name(model.device),
        "model_alone": alone,
        "worker_path_one_text": single,
        "worker_path_32_texts": multi,
        "replicas_sharing_the_device": replicas,
        "one_text_share_of_model": single["sentences_per_s"] / best_alone,
        "32_texts_share_of_model": multi["sentences_per_s"] / best_alone,
        "min_cosine_vs_cpu": agreement,
    }


def minilm_device_markdown(result: dict[str, Any]) -> list[str]:
    one, many = result["worker_path_one_text"], result["worker_path_32_texts"]
    lines = [
        "",
        f"embed-minilm on {result['device_name']} ({result['device']}): the model alone, then fed by the "
        "worker path (broker, JobWorker, callbacks queue):",
        "",
        "| model alone, batch | sentences/s | ms per batch |",
        "|---|---|---|",
    ]
    lines += [
        f"| {batch} | {r['sentences_per_s']:.0f} | {r['ms_per_batch']:.2f} |"
        for batch, r in result["model_alone"].items()
    ]
    lines += [
        "",
        f"- one text per job: {one['jobs_per_s']:.0f} jobs/s (mean batch {one['mean_batch_size']:.0f}, "
        f"{one['process_cpu_ms_per_job']:.2f} ms CPU per job in the worker process), "
        f"{result['one_text_share_of_model']:.1%} of the model alone",
        f"- 32 texts per job: {many['sentences_per_s']:.0f} sentences/s ({many['jobs_per_s']:.0f} jobs/s), "
        f"{result['32_texts_share_of_model']:.1%} of the model alone",
        f"- embeddings against the CPU's, same weights: min cosine {result['min_cosine_vs_cpu']:.6f}",
        "",
        "One-text jobs, several worker replicas sharing the device (a process each):",
        "",
        "| replicas | jobs/s | mean batch | batch p95 ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r['jobs_per_s']:.0f} | {r['mean_batch_size']:.0f} | {r['batch_latency_p95_ms']:.0f} |"
        for n, r in result["replicas_sharing_the_device"].items()
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.minilm_device", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--single-jobs", type=int, default=6000)
    parser.add_argument("--multi-jobs", type=int, default=1500)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown")
    args = parser.parse_args()
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    result = asyncio.run(
        measure_minilm_device(amqp_url, args.reps, args.single_jobs, args.multi_jobs, tuple(args.replicas))
    )
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm-device.json").write_text(json.dumps(result, indent=2))
    summary = "\n".join(minilm_device_markdown(result)) + "\n"
    (args.out / "minilm-device.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
