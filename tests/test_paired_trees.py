"""The paired-trees bench's arithmetic: a pair's ratio is of its sides' medians, the
figure is the median pair, and CPU and losses are summed over every run of each side."""

from __future__ import annotations

from typing import Any

import pytest

from bench.paired_trees import pair_summary


def _runs(*rates: float, ingress_ms: float = 0.5, lost: int = 0) -> list[dict[str, Any]]:
    return [
        {"jobs_per_s": rate, "lost": lost, "duplicates": 0, "cpu_ms_per_job": {"ingress": ingress_ms}}
        for rate in rates
    ]


def test_the_figure_is_the_median_pair_of_ratios_of_each_sides_median_run() -> None:
    pairs = [
        {"base": _runs(900, 1000, 1100), "head": _runs(950, 1000, 2000)},  # 1000 vs 1000
        {"base": _runs(800, 800, 800), "head": _runs(720, 720, 900, ingress_ms=0.6)},  # 0.90
        {"base": _runs(1000, 1000, 1000), "head": _runs(1100, 1100, 1100, lost=1)},  # 1.10
    ]

    summary = pair_summary(pairs)

    assert summary["pair_ratios"] == pytest.approx([1.0, 0.9, 1.1])
    assert summary["median_pair_ratio"] == pytest.approx(1.0)
    assert summary["jobs_per_s"] == {"base": [1000, 800, 1000], "head": [1000, 720, 1100]}
    # Every run: base 800 x3, 900, 1000 x4, 1100 -> 1000; head 720 x2, 900, 950, 1000, 1100 x3, 2000 -> 1000.
    assert summary["ratio_of_medians"] == pytest.approx(1.0)
    assert summary["cpu_ms_per_job"] == {"base": {"ingress": 0.5}, "head": {"ingress": 0.5}}
    assert (summary["lost"], summary["duplicates"]) == (3, 0)
