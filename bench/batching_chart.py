"""The batching trade-off as a picture: jobs/s against batch model time (p95) for each
fixed batch size and for the adaptive controller, with the latency target drawn in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt


def batching_chart(batching: dict[str, Any], path: Path) -> None:
    summary = batching["summary"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    fixed = sorted(
        (s["batch_latency_p95_ms"], s["jobs_per_s"], name)
        for name, s in summary.items()
        if name.startswith("fixed-")
    )
    axes.plot([f[0] for f in fixed], [f[1] for f in fixed], "o-", color="tab:blue", label="fixed batch size")
    for latency, rate, name in fixed:
        axes.annotate(
            name.removeprefix("fixed-"), (latency, rate), textcoords="offset points", xytext=(5, -12)
        )
    adaptive = summary["adaptive"]
    axes.plot(
        adaptive["batch_latency_p95_ms"],
        adaptive["jobs_per_s"],
        "*",
        markersize=16,
        color="tab:red",
        label=f"adaptive (mean batch {adaptive['mean_batch_size']:.0f})",
    )
    axes.axvline(batching["latency_target_ms"], linestyle="--", color="grey", label="latency target")
    axes.set_xlabel("batch model time, p95 (ms)")
    axes.set_ylabel("jobs/s, queue kept full")
    axes.set_title(f"{batching['model']}: throughput vs batch latency")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
