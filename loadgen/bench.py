"""`task bench`: how fast the pipeline is, as ratios measured side by side in one run.

This machine is shared and noisy, so every figure is a ratio of two things measured
back to back in the same run (median of `--reps` repetitions), with the raw numbers
kept. Writes bench/results/<timestamp>.json and a markdown summary next to it.
`--quick` is a smoke-sized run (CI runs it once to check that it works, not the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.config import DEFAULT_AMQP_URL
from loadgen.bench_chart import batching_chart
from loadgen.bench_ingress import measure_ingress
from loadgen.bench_pipeline import measure_pipeline
from loadgen.bench_workers import measure_batching, measure_priority
from ray_workers.models.minilm import MiniLMModel
from ray_workers.models.synthetic import SyntheticModel

RESULTS_DIR = Path("bench/results")


@dataclass(frozen=True)
class BenchSize:
    reps: int
    ingress_jobs: int
    pipeline_jobs: int
    batching_jobs: int
    sweep: list[int]
    flood_jobs: int
    high_jobs: int


FULL = BenchSize(
    reps=3,
    ingress_jobs=2000,
    pipeline_jobs=100,
    batching_jobs=1000,
    sweep=[8, 32, 64, 128],
    flood_jobs=1200,
    high_jobs=20,
)
QUICK = BenchSize(
    reps=1, ingress_jobs=300, pipeline_jobs=20, batching_jobs=200, sweep=[32], flood_jobs=200, high_jobs=10
)


async def run(size: BenchSize, amqp_url: str, latency_target_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    started = time.monotonic()
    print("1/5 ingress efficiency ...", flush=True)
    results["ingress"] = await measure_ingress(amqp_url, size.reps, size.ingress_jobs)
    print("2/5 pipeline overhead ...", flush=True)
    results["pipeline"] = await measure_pipeline(amqp_url, size.reps, rate=20, count=size.pipeline_jobs)
    print("3-4/5 batching gain and controller quality (embed-minilm) ...", flush=True)
    results["batching"] = await measure_batching(
        amqp_url,
        MiniLMModel(),
        reps=size.reps,
        count=size.batching_jobs,
        sweep=size.sweep,
        latency_target_s=latency_target_s,
    )
    print("5/5 priority isolation ...", flush=True)
    results["priority"] = await measure_priority(
        amqp_url, SyntheticModel(), reps=size.reps, flood=size.flood_jobs, high=size.high_jobs
    )
    results["elapsed_s"] = time.monotonic() - started
    return results


def ratios(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    batching, pipeline, priority = results["batching"], results["pipeline"], results["priority"]
    summary, low = batching["summary"], batching["low_load_p50_ms"]
    return [
        (
            "Ingress efficiency: HTTP jobs/s accepted / bare pipelined publisher msg/s",
            results["ingress"]["ratio"],
            f"{_median(results['ingress']['ingress_jobs_per_s']):.0f} / "
            f"{_median(results['ingress']['bare_publish_msgs_per_s']):.0f}",
        ),
        (
            "Pipeline overhead p50: queued submit-to-callback (less model time) / direct Serve HTTP",
            pipeline["ratio_p50"],
            f"queued p50 {pipeline['queued_p50_ms']:.1f} ms",
        ),
        (
            "Pipeline overhead p99: same, p99",
            pipeline["ratio_p99"],
            f"queued p99 {pipeline['queued_p99_ms']:.1f} ms",
        ),
        (
            "Batching gain: embed-minilm jobs/s adaptive / batch size 1",
            batching["gain_vs_batch_1"],
            f"{summary['adaptive']['jobs_per_s']:.0f} / {summary['fixed-1']['jobs_per_s']:.0f}",
        ),
        (
            f"Controller quality: adaptive / best fixed size ({batching['best_fixed']}) with batch p95 "
            f"under {batching['latency_target_ms']:.0f} ms",
            batching["adaptive_vs_best_fixed"],
            f"{summary['adaptive']['jobs_per_s']:.0f} / {summary[batching['best_fixed']]['jobs_per_s']:.0f}; "
            f"adaptive batch p95 {summary['adaptive']['batch_latency_p95_ms']:.0f} ms",
        ),
        (
            "Low-load latency p50: adaptive / batch size 1",
            batching["low_load_latency_ratio"],
            f"{low['adaptive']:.1f} / {low['fixed-1']:.1f} ms",
        ),
        (
            "Priority isolation: high-priority p99 with a low-priority flood / without",
            priority["ratio"],
            f"{priority['high_p99_ms_flood']:.0f} / {priority['high_p99_ms_no_flood']:.0f} ms",
        ),
    ]


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def markdown(results: dict[str, Any], machine: str, quick: bool) -> str:
    lines = [
        f"# Benchmark {results['timestamp']}{' (quick)' if quick else ''}",
        "",
        f"Machine: {machine}. Repetitions: {results['reps']} (medians). Took {results['elapsed_s']:.0f} s.",
        "",
        "| figure | ratio | raw |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value:.2f} | {raw} |" for name, value, raw in ratios(results)]
    summary = results["batching"]["summary"]
    lines += [
        "",
        "embed-minilm with the queue kept full:",
        "",
        "| batching | jobs/s | batch p95 ms | mean batch |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['jobs_per_s']:.0f} | {s['batch_latency_p95_ms']:.1f} | {s['mean_batch_size']:.1f} |"
        for name, s in summary.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (CI)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3, quick 1)")
    parser.add_argument("--latency-target-ms", type=float, default=100.0, help="batch latency target")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.reps:
        size = BenchSize(**{**size.__dict__, "reps": args.reps})
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    results = asyncio.run(run(size, amqp_url, args.latency_target_ms / 1000))
    timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, CPU (no GPU)"
    )
    results.update(timestamp=timestamp, reps=size.reps, quick=args.quick, machine=machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{timestamp}.json").write_text(json.dumps(results, indent=2))
    batching_chart(results["batching"], args.out / f"{timestamp}-batching.png")
    summary = markdown(results, machine, args.quick) + f"\n![batching]({timestamp}-batching.png)\n"
    (args.out / f"{timestamp}.md").write_text(summary)
    print("\n" + summary)
    print(f"written: {args.out / f'{timestamp}.json'}, .md and -batching.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
