"""What a load run recorded, accounted for, and written as JSON, markdown and a PNG timeline.

Per job: its scheduled submit time, the answer (202, 503, other; 0 = no answer), the
answer's latency, and its callback (time, type, webhook-id). Per second: offered,
accepted, refused, completed, in flight, callback latency p50/p95/p99 per priority,
queue depths and replicas. At the end: accepted, terminal, lost (accepted, no callback
by the end of the drain wait), duplicates (a webhook-id seen twice), refused; per
phase, the accepted share of what was offered and the time to drain it.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadgen.measurement import percentile
from loadgen.profiles import Profile
from loadgen.receiver_process import ReceivedRecord
from wire.envelope import Priority

PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")


@dataclass
class JobRecord:
    index: int
    at_s: float  # scheduled submit time, from the start of the run
    priority: Priority
    phase: str
    status: int = -1  # HTTP status; 0: no answer (transport error); -1: never sent
    answered_s: float = math.nan
    job_id: str = ""


@dataclass
class Sample:
    at_s: float
    queue_depths: dict[str, int]
    replicas: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    profile: Profile
    started_wall_s: float
    jobs: list[JobRecord]
    callbacks: list[ReceivedRecord]
    samples: list[Sample]


@dataclass(frozen=True)
class Summary:
    text: str
    lost: int


def account(record: RunRecord) -> dict[str, Any]:
    """The totals, per phase, and per second."""
    jobs = record.jobs
    accepted = [job for job in jobs if job.status == 202]
    first_callback: dict[str, ReceivedRecord] = {}
    for callback in sorted(record.callbacks, key=lambda r: r.received_wall_s):
        first_callback.setdefault(callback.job_id, callback)
    webhook_ids = Counter(callback.webhook_id for callback in record.callbacks)
    lost = [job.job_id for job in accepted if job.job_id not in first_callback]
    totals = {
        "offered": len(jobs),
        "accepted": len(accepted),
        "refused": sum(1 for job in jobs if job.status not in (202, 0, -1)),
        "unanswered": sum(1 for job in jobs if job.status in (0, -1)),
        "terminal": len(accepted) - len(lost),
        "lost": len(lost),
        "duplicates": sum(count - 1 for count in webhook_ids.values()),
        "unverified": sum(1 for callback in record.callbacks if not callback.verified),
        "answer_p50_ms": percentile([job.answered_s - job.at_s for job in jobs if job.status > 0], 50) * 1000,
        "answer_p99_ms": percentile([job.answered_s - job.at_s for job in jobs if job.status > 0], 99) * 1000,
    }
    done_s = {
        job.job_id: first_callback[job.job_id].received_wall_s - record.started_wall_s
        for job in accepted
        if job.job_id in first_callback
    }
    return {
        "profile": asdict(record.profile),
        "started": datetime.fromtimestamp(record.started_wall_s, UTC).isoformat(),
        "totals": totals,
        "phases": _phases(record, done_s),
        "latency_s": {p: _latencies(record, done_s, p) for p in PRIORITIES},
        "seconds": _per_second(record, done_s),
        "lost_ids": lost[:100],
    }


def _latencies(record: RunRecord, done_s: dict[str, float], priority: Priority) -> dict[str, float]:
    latencies = [
        done_s[job.job_id] - job.at_s
        for job in record.jobs
        if job.priority == priority and job.job_id in done_s
    ]
    return {"count": len(latencies), **{f"p{q}": percentile(latencies, q) for q in (50, 95, 99)}}


def _phases(record: RunRecord, done_s: dict[str, float]) -> list[dict[str, Any]]:
    phases = []
    start_s = 0.0
    for phase in record.profile.phases:
        mine = [job for job in record.jobs if job.phase == phase.name]
        accepted = [job for job in mine if job.status == 202]
        finished = [done_s[job.job_id] for job in accepted if job.job_id in done_s]
        phases.append(
            {
                "name": phase.name,
                "start_s": start_s,
                "duration_s": phase.duration_s,
                "offered": len(mine),
                "accepted": len(accepted),
                "accepted_share": len(accepted) / len(mine) if mine else math.nan,
                # From the phase's start to the last callback of a job it accepted.
                "drain_s": max(finished) - start_s if finished else math.nan,
                "high_p99_s": percentile(
                    [
                        done_s[j.job_id] - j.at_s
                        for j in accepted
                        if j.priority == "high" and j.job_id in done_s
                    ],
                    99,
                ),
            }
        )
        start_s += phase.duration_s
    return phases


def _per_second(record: RunRecord, done_s: dict[str, float]) -> list[dict[str, Any]]:
    offered: Counter[int] = Counter(int(job.at_s) for job in record.jobs)
    accepted: Counter[int] = Counter(int(job.at_s) for job in record.jobs if job.status == 202)
    refused: Counter[int] = Counter(int(job.at_s) for job in record.jobs if job.status not in (202, -1))
    completed: Counter[int] = Counter(int(at_s) for at_s in done_s.values())
    latency: dict[tuple[int, str], list[float]] = defaultdict(list)
    for job in record.jobs:
        if job.job_id in done_s:
            latency[(int(done_s[job.job_id]), job.priority)].append(done_s[job.job_id] - job.at_s)
    samples = {int(sample.at_s): sample for sample in record.samples}
    last = max([*offered, *completed, *samples, 0])
    seconds, in_flight = [], 0
    for second in range(last + 1):
        in_flight += accepted[second] - completed[second]
        sample = samples.get(second)
        seconds.append(
            {
                "second": second,
                "offered": offered[second],
                "accepted": accepted[second],
                "refused": refused[second],
                "completed": completed[second],
                "in_flight": in_flight,
                "latency_s": {
                    p: {f"p{q}": percentile(latency[(second, p)], q) for q in (50, 95, 99)}
                    for p in PRIORITIES
                    if latency[(second, p)]
                },
                "queue_depths": sample.queue_depths if sample else {},
                "replicas": sample.replicas if sample else {},
            }
        )
    return seconds


def write_report(record: RunRecord, out_dir: Path) -> Summary:
    """`<profile>-<time>.json`, `.md` and `.png` in `out_dir`; returns the markdown text."""
    report = account(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (
        out_dir / f"{record.profile.name}-{datetime.fromtimestamp(record.started_wall_s, UTC):%Y%m%dT%H%M%SZ}"
    )
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    text = _markdown(report, stem.with_suffix(".png").name)
    stem.with_suffix(".md").write_text(text)
    _timeline(report, stem.with_suffix(".png"))
    return Summary(text, report["totals"]["lost"])


def _markdown(report: dict[str, Any], png_name: str) -> str:
    totals = report["totals"]
    lines = [
        f"# Load run: {report['profile']['name']} ({report['started']})",
        "",
        report["profile"]["description"],
        "",
        "| offered | accepted | refused | unanswered | terminal | lost | duplicates | 202 p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        f"| {totals['offered']} | {totals['accepted']} | {totals['refused']} | {totals['unanswered']} | "
        f"{totals['terminal']} | {totals['lost']} | {totals['duplicates']} | "
        f"{totals['answer_p50_ms']:.1f} / {totals['answer_p99_ms']:.1f} |",
        "",
        "| phase | offered/s | accepted share | drain s (phase start to last callback) | high p99 s |",
        "|---|---|---|---|---|",
    ]
    for phase in report["phases"]:
        lines.append(
            f"| {phase['name']} | {phase['offered'] / phase['duration_s']:.0f} | "
            f"{phase['accepted_share']:.3f} | {phase['drain_s']:.1f} | {phase['high_p99_s']:.3f} |"
        )
    lines += [
        "",
        "| priority | callbacks | latency p50 / p95 / p99 s (submit to verified callback) |",
        "|---|---|---|",
    ]
    for priority, latency in report["latency_s"].items():
        if latency["count"]:
            quantiles = " / ".join(f"{latency[q]:.3f}" for q in ("p50", "p95", "p99"))
            lines.append(f"| {priority} | {latency['count']} | {quantiles} |")
    lines += ["", f"![timeline]({png_name})", ""]
    return "\n".join(lines)


def _timeline(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = report["seconds"]
    xs = [row["second"] for row in seconds]
    figure, (rates, latency, depth) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for key in ("offered", "accepted", "completed", "refused"):
        rates.plot(xs, [row[key] for row in seconds], label=f"{key}/s")
    rates.set_ylabel("jobs/s")
    rates.legend(loc="upper right")
    for priority in PRIORITIES:
        for q, style in (("p50", "-"), ("p99", "--")):
            ys = [row["latency_s"].get(priority, {}).get(q, math.nan) for row in seconds]
            if any(not math.isnan(y) for y in ys):
                latency.plot(xs, ys, style, label=f"{priority} {q}")
    latency.set_ylabel("callback latency s")
    latency.legend(loc="upper right")
    queues = sorted({queue for row in seconds for queue in row["queue_depths"]})
    for queue in queues:
        depth.plot(xs, [row["queue_depths"].get(queue, math.nan) for row in seconds], label=queue)
    depth.set_ylabel("queue depth")
    replicas_axis = depth.twinx()
    models = sorted({model for row in seconds for model in row["replicas"]})
    for model in models:
        ys = [row["replicas"].get(model, math.nan) for row in seconds]
        replicas_axis.step(xs, ys, where="post", linestyle="-.", label=f"{model} replicas")
        for second in _scale_events(seconds, model):
            for axis in (rates, latency, depth):
                axis.axvline(second, color="grey", linestyle=":")
    replicas_axis.set_ylabel("replicas")
    if queues:
        depth.legend(loc="upper left")
    if models:
        replicas_axis.legend(loc="upper right")
    depth.set_xlabel("seconds from the first submission (dotted: scale events)")
    figure.suptitle(f"{report['profile']['name']}: {report['profile']['description'][:100]}")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _scale_events(seconds: list[dict[str, Any]], model: str) -> list[int]:
    """The seconds at which the model's replica count changed."""
    events, previous = [], None
    for row in seconds:
        now = row["replicas"].get(model)
        if now is not None and previous is not None and now != previous:
            events.append(row["second"])
        previous = now if now is not None else previous
    return events
