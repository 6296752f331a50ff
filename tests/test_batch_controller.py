"""The AIMD batch-size controller, table-driven (no clock: latencies are fed in)."""

from __future__ import annotations

import pytest

from ray_workers.batch_controller import AdaptiveBatchController, Adjustment, FixedBatchSize

TARGET_S = 0.1


def controller(size: int, slow_start: bool = False) -> AdaptiveBatchController:
    return AdaptiveBatchController(
        latency_target_s=TARGET_S, max_size=64, size=size, step=4, backoff=0.5, slow_start=slow_start
    )


# (why, size before, batch size, latency, work waiting, adjustment, size after, wait after)
ROWS = [
    ("full batch under target with backlog grows by the step", 8, 8, 0.05, True, Adjustment.GROW, 12, 0.005),
    ("between the headroom and the target it holds", 8, 8, 0.095, True, Adjustment.HOLD, 8, 0.005),
    ("growth stops at max_size", 64, 64, 0.05, True, Adjustment.HOLD, 64, 0.005),
    ("a partial batch does not grow (no real backlog)", 8, 5, 0.05, True, Adjustment.HOLD, 8, 0.005),
    (
        "no backlog holds, and the next lone job is not made to wait",
        8,
        8,
        0.05,
        False,
        Adjustment.HOLD,
        8,
        0.0,
    ),
    ("over target backs off multiplicatively", 32, 32, 0.2, True, Adjustment.BACKOFF, 16, 0.005),
    (
        "back-off starts from the batch that ran, not a larger size",
        32,
        10,
        0.2,
        True,
        Adjustment.BACKOFF,
        5,
        0.005,
    ),
    ("never below min_size", 1, 1, 0.5, True, Adjustment.HOLD, 1, 0.005),
    ("over target at size 2 goes to 1", 2, 2, 0.5, False, Adjustment.BACKOFF, 1, 0.0),
]


@pytest.mark.parametrize(
    ("why", "before", "batch", "latency", "waiting", "adjustment", "after", "wait"),
    ROWS,
    ids=[r[0] for r in ROWS],
)
def test_controller_step(
    why: str,
    before: int,
    batch: int,
    latency: float,
    waiting: bool,
    adjustment: Adjustment,
    after: int,
    wait: float,
) -> None:
    control = controller(before)
    assert control.record(batch, latency, waiting) is adjustment
    assert control.size == after
    assert control.wait_s == wait


def test_slow_start_doubles_until_the_target_is_first_missed_then_adds() -> None:
    control = controller(1, slow_start=True)
    sizes = []
    for latency in (0.01, 0.01, 0.01, 0.01, 0.2, 0.01, 0.01):
        control.record(control.size, latency, work_waiting=True)
        sizes.append(control.size)
    assert sizes == [2, 4, 8, 16, 8, 12, 16]


def test_under_a_steady_backlog_the_size_converges_below_the_target() -> None:
    """A model whose batch latency is 2 ms + 1 ms per job, target 100 ms: the size
    doubles to 128 (over), backs off, and settles between the headroom and the target."""
    control = AdaptiveBatchController(latency_target_s=TARGET_S, max_size=256, size=1, step=4, backoff=0.9)
    sizes = []
    for _ in range(200):
        batch = control.size
        control.record(batch, 0.002 + 0.001 * batch, work_waiting=True)
        sizes.append(control.size)
    settled = sizes[100:]
    assert max(settled) <= 102 and min(settled) >= 85, settled
    assert sum(settled) / len(settled) > 90


def test_a_fixed_size_never_moves() -> None:
    fixed = FixedBatchSize(latency_target_s=TARGET_S, max_size=32, size=32)
    assert fixed.record(32, 5.0, True) is Adjustment.HOLD and fixed.size == 32


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_size": 0},
        {"max_size": 4, "min_size": 5},
        {"max_size": 4, "backoff": 1.0},
        {"max_size": 4, "latency_target_s": 0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveBatchController(**{"latency_target_s": TARGET_S, **kwargs})  # type: ignore[arg-type]
