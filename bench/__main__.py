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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.batch_options import measure_batch_options
from bench.batching_chart import batching_chart
from bench.budgets import budget_markdown, measure_budgets
from bench.callback_stage import measure_callbacks
from bench.express_lane import measure_express_lane
from bench.ingress_efficiency import measure_ingress
from bench.minilm_device import measure_minilm_device, minilm_device_markdown
from bench.paired_trees import measure_paired_trees
from bench.payload_path import measure_payload_path, payload_markdown
from bench.pipeline_overhead import measure_pipeline
from bench.python_profile import measure_profile, profile_markdown
from bench.tenant_limits import measure_tenant_limits
from bench.tenant_share import measure_tenant_share
from bench.user_path import measure_user_path
from bench.versus_celery import FULL_SIZE, QUICK_SIZE, measure_versus_celery
from bench.wake_from_zero import measure_wake
from bench.worker_path import measure_batching, measure_priority, measure_queue_types
from ray_workers.models.minilm import MiniLMModel
from ray_workers.models.synthetic import SyntheticModel
from settings.environment import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL
from wire.topology import QUEUE_TYPES

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
    user_path_backlogs: list[tuple[str, int]]
    callback_deliveries: int
    profile_jobs: int
    queue_type_backlogs: dict[str, int]
    # embed-minilm on its device: one-text jobs, 32-text jobs, replica counts.
    device_jobs: tuple[int, int, tuple[int, ...]]


FULL = BenchSize(
    reps=3,
    ingress_jobs=2000,
    pipeline_jobs=100,
    batching_jobs=1000,
    sweep=[8, 32, 64, 128],
    flood_jobs=1200,
    high_jobs=20,
    user_path_backlogs=[("echo", 2000), ("embed-minilm", 500), ("embed-minilm", 2000)],
    callback_deliveries=3000,
    profile_jobs=4000,
    queue_type_backlogs={"echo": 2000, "embed-minilm": 1000},
    device_jobs=(2000, 100, (1, 2)),
)
QUICK = BenchSize(
    reps=1,
    ingress_jobs=300,
    pipeline_jobs=20,
    batching_jobs=200,
    sweep=[32],
    flood_jobs=200,
    high_jobs=10,
    user_path_backlogs=[("echo", 300), ("embed-minilm", 100)],
    callback_deliveries=300,
    profile_jobs=300,
    queue_type_backlogs={"echo": 300},
    device_jobs=(300, 20, (1, 2)),
)
STAGES = (
    "versus-celery",
    "batch-options",
    "tenant-limits",
    "tenant-share",
    "user-path",
    "callbacks",
    "profile",
    "budgets",
    "ingress",
    "pipeline",
    "batching",
    "priority",
    "queue-types",
    "minilm-device",
    "payloads",
)
# Run only when asked (`--only wake`): it starts the whole stack 2 x reps times;
# `--only paired-trees --base REV`, which measures another commit beside this tree; and
# `--only express-lane`, the callback express lane on and off in alternating stacks.
OPTIONAL_STAGES = ("wake", "paired-trees", "express-lane")
# express-lane: alternating pairs, low-load jobs and echo backlog jobs per side.
EXPRESS_LANE_FULL = (3, 300, 2000)
EXPRESS_LANE_QUICK = (1, 100, 300)
# paired-trees: alternating pairs, echo backlogs per side and pair, jobs per backlog.
PAIRED_TREES_FULL = (8, 3, 2000)
PAIRED_TREES_QUICK = (1, 1, 300)


async def run(
    size: BenchSize,
    amqp_url: str,
    redis_url: str,
    latency_target_s: float,
    stages: list[str],
    quick: bool = False,
    base: str | None = None,
) -> dict[str, Any]:
    stage_runs: dict[str, Callable[[], Awaitable[Any]]] = {
        "versus-celery": lambda: measure_versus_celery(
            amqp_url, size.reps, QUICK_SIZE if quick else FULL_SIZE
        ),
        "batch-options": lambda: measure_batch_options(amqp_url, size.reps, 2000 if quick else 20_000),
        "tenant-limits": lambda: measure_tenant_limits(
            amqp_url, redis_url, size.reps, 5.0 if quick else 30.0
        ),
        "tenant-share": lambda: measure_tenant_share(
            amqp_url, size.reps, 300 if quick else 3000, 5 if quick else 20
        ),
        "user-path": lambda: measure_user_path(amqp_url, size.reps, size.user_path_backlogs),
        "callbacks": lambda: measure_callbacks(amqp_url, size.reps, size.callback_deliveries),
        "profile": lambda: measure_profile(amqp_url, size.profile_jobs),
        "budgets": lambda: measure_budgets(amqp_url, quick),
        "wake": lambda: measure_wake(amqp_url, size.reps),
        "paired-trees": lambda: measure_paired_trees(
            amqp_url, _required_base(base), *(PAIRED_TREES_QUICK if quick else PAIRED_TREES_FULL)
        ),
        "express-lane": lambda: measure_express_lane(
            amqp_url, *(EXPRESS_LANE_QUICK if quick else EXPRESS_LANE_FULL)
        ),
        "ingress": lambda: measure_ingress(amqp_url, redis_url, size.reps, size.ingress_jobs),
        "pipeline": lambda: measure_pipeline(amqp_url, size.reps, rate=20, count=size.pipeline_jobs),
        "batching": lambda: measure_batching(
            amqp_url,
            MiniLMModel(),
            reps=size.reps,
            count=size.batching_jobs,
            sweep=size.sweep,
            latency_target_s=latency_target_s,
        ),
        "queue-types": lambda: measure_queue_types(amqp_url, size.reps, size.queue_type_backlogs),
        "priority": lambda: _priority_by_queue_type(amqp_url, size),
        "minilm-device": lambda: measure_minilm_device(amqp_url, size.reps, *size.device_jobs),
        "payloads": lambda: measure_payload_path(amqp_url, size.reps, 20 if quick else 100, 2**20),
    }
    results: dict[str, Any] = {}
    started = time.monotonic()
    for n, stage in enumerate(stages, 1):
        print(f"{n}/{len(stages)} {stage} ...", flush=True)
        results[stage] = await stage_runs[stage]()
    results["elapsed_s"] = time.monotonic() - started
    return results


def _required_base(base: str | None) -> str:
    if base is None:
        raise SystemExit("the paired-trees stage needs --base REV: the commit to measure this tree against")
    return base


async def _priority_by_queue_type(amqp_url: str, size: BenchSize) -> dict[str, Any]:
    return {
        queue_type: await measure_priority(
            amqp_url,
            SyntheticModel(),
            reps=size.reps,
            flood=size.flood_jobs,
            high=size.high_jobs,
            queue_type=queue_type,
        )
        for queue_type in QUEUE_TYPES
    }


def ratios(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    if "versus-celery" in results:
        rows += _versus_celery_rows(results["versus-celery"]["summary"])
    one_row_stages = {
        "batch-options": _batch_options_row,
        "tenant-limits": _tenant_limits_row,
        "tenant-share": _tenant_share_row,
        "paired-trees": _paired_trees_row,
        "express-lane": _express_lane_row,
    }
    rows += [row(results[stage]) for stage, row in one_row_stages.items() if stage in results]
    if "user-path" in results:
        rows += _user_path_rows(results)
    if "callbacks" in results:
        rows += _callback_rows(results)
    if "wake" in results:
        medians = results["wake"]["medians"]
        for model, push in medians["push"].items():
            poll = medians["poll"][model]
            rows.append(
                (
                    f"Wake from zero, {model}: first callback, push activation (polling 30 s) / polling 5 s",
                    push["callback_s"] / poll["callback_s"],
                    f"{push['callback_s']:.1f} / {poll['callback_s']:.1f} s; push: detection "
                    f"{push['detection_s']:.2f} s, replica start {push['replica_start_s']:.1f} s (model load "
                    f"{push['model_load_s']:.2f} s), first batch {push['first_batch_ms']:.0f} ms",
                )
            )
    if "ingress" in results:
        ingress = results["ingress"]
        rows.append(
            (
                "Ingress efficiency: HTTP jobs/s accepted / bare pipelined publisher msg/s",
                ingress["ratio"],
                f"{_median(ingress['ingress_jobs_per_s']):.0f} / "
                f"{_median(ingress['bare_publish_msgs_per_s']):.0f}",
            )
        )
        rows.append(
            (
                "Demand events: HTTP jobs/s accepted with DEMAND_EVENTS on / off",
                ingress["demand_events_ratio"],
                f"{_median(ingress['ingress_jobs_per_s']):.0f} / "
                f"{_median(ingress['ingress_without_demand_events_jobs_per_s']):.0f}",
            )
        )
        rows.append(
            (
                "Job records: HTTP jobs/s accepted with REDIS_URL on / off",
                ingress["records_ratio"],
                f"{_median(ingress['ingress_with_records_jobs_per_s']):.0f} / "
                f"{_median(ingress['ingress_jobs_per_s']):.0f}; Prefer: wait=5 on echo, one at a time: "
                f"p50 {ingress['wait_p50_ms']:.1f} ms, p99 {ingress['wait_p99_ms']:.1f} ms",
            )
        )
    if "pipeline" in results:
        pipeline = results["pipeline"]
        rows += [
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
        ]
    if "batching" in results:
        rows += _batching_rows(results["batching"])
    for queue_type, priority in results.get("priority", {}).items():
        rows.append(
            (
                f"Priority isolation ({queue_type}): high-priority p99 with a low-priority flood / without",
                priority["ratio"],
                f"{priority['high_p99_ms_flood']:.0f} / {priority['high_p99_ms_no_flood']:.0f} ms",
            )
        )
    for model, rates in results.get("queue-types", {}).items():
        rows.append(
            (
                f"Replication cost, {model} worker alone: jobs/s on quorum queues / on classic queues",
                rates["ratio"],
                f"{rates['quorum']:.0f} / {rates['classic']:.0f} per s",
            )
        )
    return rows


def _batch_options_row(options: dict[str, Any]) -> tuple[str, float, str]:
    single, chunk = options["summary"]["per-job messages"], options["summary"]["chunk messages"]
    return (
        f"Batch options: message-path CPU per job, chunks of {options['chunk_jobs']} / one per job",
        chunk["total_ms"] / single["total_ms"],
        f"{chunk['total_ms']:.3f} / {single['total_ms']:.3f} ms (client {chunk['client_ms']:.3f} / "
        f"{single['client_ms']:.3f}, broker {chunk['broker_ms']:.3f} / {single['broker_ms']:.3f})",
    )


def _tenant_limits_row(limits: dict[str, Any]) -> tuple[str, float, str]:
    return (
        f"Tenant limit {limits['rate_per_s']}/s, burst {limits['burst']}, through two ingresses for "
        f"{limits['duration_s']:.0f} s: jobs accepted / burst + rate x elapsed",
        limits["ratio"],
        f"{[run['accepted'] for run in limits['runs']]} accepted; refusals without Retry-After and "
        f"RateLimit headers: {limits['refusals_without_headers']}",
    )


def _tenant_share_row(share: dict[str, Any]) -> tuple[str, float, str]:
    one = share["one_lane"]
    return (
        "Tenant B's single jobs beside tenant A's embed-minilm backlog: B's p50, one lane / tenant lanes",
        one["b_p50_s"] / share["b_p50_s"],
        f"lanes: B p50 {share['b_p50_s']:.2f} s, max {share['b_max_s']:.2f} s, A's rate beside B / alone "
        f"{share['a_ratio']:.2f}; one lane: B p50 {one['b_p50_s']:.2f} s, max {one['b_max_s']:.2f} s; "
        f"lost {share['lost'] + one['lost']}, duplicates {share['duplicates'] + one['duplicates']}",
    )


def _paired_trees_row(paired: dict[str, Any]) -> tuple[str, float, str]:
    rates = paired["jobs_per_s"]
    cpu = paired["cpu_ms_per_job"]
    totals = {side: sum(cpu[side].values()) for side in cpu}
    return (
        f"User path, echo x{paired['jobs']} to one host: {paired['head']} / {paired['base']}, "
        f"median of {paired['pairs']} alternating pairs",
        paired["median_pair_ratio"],
        f"pair ratios {', '.join(f'{r:.2f}' for r in paired['pair_ratios'])}; ratio of the medians of every "
        f"run {paired['ratio_of_medians']:.2f}; jobs/s base {' / '.join(f'{r:.0f}' for r in rates['base'])}, "
        f"this tree {' / '.join(f'{r:.0f}' for r in rates['head'])}; CPU ms per job base "
        f"{totals['base']:.2f} (ingress {cpu['base'].get('ingress', 0.0):.2f}), this tree "
        f"{totals['head']:.2f} (ingress {cpu['head'].get('ingress', 0.0):.2f}); "
        f"lost {paired['lost']}, duplicates {paired['duplicates']}",
    )


def _express_lane_row(lane: dict[str, Any]) -> tuple[str, float, str]:
    summary = lane["summary"]
    on, off = summary["on"], summary["off"]
    return (
        "Callback express lane, echo low load: submit -> verified callback p50, lane on / off "
        f"(median of {len(summary['pair_p50_ratios'])} alternating pairs)",
        summary["median_pair_p50_ratio"],
        f"p50 {on['p50_ms']:.2f} vs {off['p50_ms']:.2f} ms, p99 {on['p99_ms']:.1f} vs {off['p99_ms']:.1f}, "
        f"outcome -> callback {on['outcome_to_callback_ms']:.2f} vs {off['outcome_to_callback_ms']:.2f}, "
        f"202 {on['accepted_p50_ms']:.2f} vs {off['accepted_p50_ms']:.2f}; pair p50 ratios "
        f"{' / '.join(f'{r:.2f}' for r in summary['pair_p50_ratios'])}; "
        f"echo x{lane['backlog_jobs']} backlog, lane on / off "
        f"{' / '.join(f'{r:.2f}' for r in summary['pair_rate_ratios'])} ({on['jobs_per_s']:.0f} vs "
        f"{off['jobs_per_s']:.0f} jobs/s); lost {summary['lost']}, duplicates {summary['duplicates']}",
    )


def _versus_celery_rows(summary: dict[str, Any]) -> list[tuple[str, float, str]]:
    rates = summary["jobs_per_s"]
    rows = [
        (
            f"Versus Celery, {name}: our jobs/s to a verified callback / Celery's drain",
            ratio,
            f"{rates[name]:.0f} per s, Celery {summary['celery_jobs_per_s'][name]:.0f} per s; each "
            f"repetition beside its Celery run "
            f"{' / '.join(f'{r:.2f}' for r in summary['paired_versus_celery'][name])}; "
            f"lost {summary['lost']}, duplicates {summary['duplicates']}",
        )
        for name, ratio in summary.get("versus_celery", {}).items()
    ]
    timeline = summary["timeline_p50_ms"]
    rows.append(
        (
            "Low load, echo one job per 50 ms: submit -> verified callback p50 / p99 (ms)",
            summary["low_load_p50_ms"] / summary["low_load_p99_ms"],
            f"p50 {summary['low_load_p50_ms']:.1f} ms, p99 {summary['low_load_p99_ms']:.1f} ms, 202 p50 "
            f"{summary['accepted_p50_ms']:.1f} ms; p50 timeline: 202 {timeline['submit_to_202']:.1f}, "
            f"to worker {timeline['submit_to_worker']:.1f}, model {timeline['model']:.2f}, to callback "
            f"{timeline['worker_to_callback']:.1f} ms (of which from the outcome "
            f"{timeline['outcome_to_callback']:.1f}); waiting for the result instead (Prefer: wait, "
            f"no callback): p50 {summary['wait_p50_ms']:.1f} ms, p99 {summary['wait_p99_ms']:.1f} ms, "
            f"{summary['wait_unanswered']} not answered with it; Celery's p50 (no HTTP, no callback) "
            f"{summary.get('celery_echo_latency_p50_ms', float('nan')):.1f} ms",
        )
    )
    floor = summary["floor_ms"]
    rows.append(
        (
            "Low load, the hops alone beside it (bench.hop_floor): submit -> callback floor / p50",
            floor["callback_floor_ms"] / summary["low_load_p50_ms"],
            f"HTTP exchange {floor['http_exchange_ms']:.2f} ms + broker one way "
            f"{floor['broker_one_way_ms']:.2f} + Redis round trip "
            f"{floor.get('redis_round_trip_ms', 0.0):.2f} "
            f"= {floor['callback_floor_ms']:.1f} ms before any of the pipeline's work, the event "
            f"by the express lane (by the broker: {floor['broker_path_floor_ms']:.1f}; p50 measured "
            f"{summary['low_load_p50_ms']:.1f}); the 202's: HTTP exchange + publish confirm "
            f"{floor['publish_confirm_ms']:.2f} = {floor['accepted_floor_ms']:.1f} ms (measured "
            f"{summary['accepted_p50_ms']:.1f})",
        )
    )
    return rows


def _versus_celery_cpu(summary: dict[str, Any]) -> list[str]:
    """Where our side's CPU went, per job and process, single jobs and batches (each
    backlog's last repetition)."""
    title = "Versus Celery, ours: where the CPU went, milliseconds per job by process (last repetition):"
    lines = ["", title, ""]
    return lines + [_cpu_line(name, cpu) for name, cpu in summary["cpu_ms_per_job"].items()]


def _cpu_line(name: str, cpu: dict[str, float]) -> str:
    """A run's CPU milliseconds per job, in all and by process (the largest first)."""
    parts = ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items() if ms >= 0.005)
    return f"- {name}: total {sum(cpu.values()):.2f} ms: {parts}"


def _user_path_rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    rows = []
    summary = results["user-path"]["summary"]
    for name, s in summary.items():
        rows.append(
            (
                f"User path {name}: jobs/s first submit to last verified callback, one host / worker alone",
                s["path_efficiency"],
                f"{s['jobs_per_s']:.0f} / {s['worker_alone_jobs_per_s']:.0f} per s; lost {s['lost']}, "
                f"duplicates {s['duplicates']}, seconds without a callback {s['zero_seconds_max']}",
            )
        )
    for name, s in summary.items():
        rows.append(
            (
                f"User path {name}: jobs/s / the box's CPU ceiling (cores / CPU ms per job, all processes)",
                s["jobs_per_s"] / s["cpu_ceiling_jobs_per_s"],
                f"{s['jobs_per_s']:.0f} / {s['cpu_ceiling_jobs_per_s']:.0f} per s",
            )
        )
    return rows


def _callback_rows(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    callbacks = results["callbacks"]
    rows = [
        (
            f"Slow host: a host's callback rate beside one answering in 2 s "
            f"({callbacks['slow_host_callbacks']} callbacks) / alone",
            callbacks["slow_host_ratio"],
            f"{callbacks['fast_beside_slow_per_s']:.0f} / {callbacks['capacity_per_s']:.0f} per s",
        ),
        (
            "Slow host, same work: that rate beside the 2 s host / beside a fast host with as many callbacks",
            callbacks["slow_vs_same_load_ratio"],
            f"{callbacks['fast_beside_slow_per_s']:.0f} / {callbacks['fast_beside_fast_per_s']:.0f} per s",
        ),
    ]
    summary = results.get("user-path", {}).get("summary", {})
    echo = next((s for name, s in summary.items() if name.startswith("echo-")), None)
    if echo is not None:
        rows.insert(
            0,
            (
                "Dispatch capacity to one no-op host / user-path echo completion rate",
                callbacks["capacity_per_s"] / echo["jobs_per_s"],
                f"{callbacks['capacity_per_s']:.0f} / {echo['jobs_per_s']:.0f} per s",
            ),
        )
    return rows


def _batching_rows(batching: dict[str, Any]) -> list[tuple[str, float, str]]:
    summary, low = batching["summary"], batching["low_load_p50_ms"]
    return [
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
    if "user-path" in results:
        lines += ["", "User path, callbacks completed per second from the first submit (median run):", ""]
        for name, runs in results["user-path"]["runs"].items():
            run = sorted(runs, key=lambda r: r["jobs_per_s"])[len(runs) // 2]
            lines.append(f"- {name}: {run['timeline']} (mean batch {run['mean_batch_size']:.0f})")
        lines += ["", "User path, where the CPU went: milliseconds per job by process (median run):", ""]
        for name, runs in results["user-path"]["runs"].items():
            run = sorted(runs, key=lambda r: r["jobs_per_s"])[len(runs) // 2]
            lines.append(_cpu_line(name, run["cpu_ms_per_job"]))
    if "versus-celery" in results:
        lines += _versus_celery_cpu(results["versus-celery"]["summary"])
    if "profile" in results:
        lines += profile_markdown(results["profile"])
    if "budgets" in results:
        lines += budget_markdown(results["budgets"])
    if "payloads" in results:
        lines += payload_markdown(results["payloads"])
    if "minilm-device" in results:
        lines += minilm_device_markdown(results["minilm-device"])
    if "batching" not in results:
        return "\n".join(lines) + "\n"
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
    parser.add_argument(
        "--only",
        action="append",
        choices=STAGES + OPTIONAL_STAGES,
        help="run only this stage (repeatable); default all but wake and paired-trees",
    )
    parser.add_argument("--base", help="paired-trees: the commit this tree is measured against")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.reps:
        size = BenchSize(**{**size.__dict__, "reps": args.reps})
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    stages = [stage for stage in STAGES + OPTIONAL_STAGES if stage in (args.only or STAGES)]
    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    results = asyncio.run(
        run(size, amqp_url, redis_url, args.latency_target_ms / 1000, stages, args.quick, args.base)
    )
    timestamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, CPU (no GPU)"
    )
    results.update(timestamp=timestamp, reps=size.reps, quick=args.quick, machine=machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{timestamp}.json").write_text(json.dumps(results, indent=2))
    summary = markdown(results, machine, args.quick)
    if "batching" in results:
        batching_chart(results["batching"], args.out / f"{timestamp}-batching.png")
        summary += f"\n![batching]({timestamp}-batching.png)\n"
    (args.out / f"{timestamp}.md").write_text(summary)
    print("\n" + summary)
    print(f"written: {args.out / f'{timestamp}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
