"""Where a model's replicas run on one machine: on the GPUs its catalogue entry asks for,
capped at what the machine holds, or on the CPU when it has too few."""

from __future__ import annotations

import pytest

from local_stack.gpu_placement import gpu_placement


@pytest.mark.parametrize(
    ("wanted", "node", "per_replica", "max_replicas", "says"),
    [
        (0, 0.0, 0.0, None, None),
        (0, 8.0, 0.0, None, None),
        (1, 0.0, 0.0, None, "asks for 1 GPU(s), this machine has 0: it runs on CPU"),
        (2, 1.0, 0.0, None, "asks for 2 GPU(s), this machine has 1: it runs on CPU"),
        (1, 1.0, 1.0, 1, "1 GPU(s) per replica, at most 1 on 1 GPU(s)"),
        (2, 5.0, 2.0, 2, "2 GPU(s) per replica, at most 2 on 5 GPU(s)"),
    ],
)
def test_a_model_reserves_its_gpus_when_the_machine_has_them(
    wanted: int, node: float, per_replica: float, max_replicas: int | None, says: str | None
) -> None:
    placement = gpu_placement("m", wanted, node)

    assert (placement.gpus_per_replica, placement.max_replicas) == (per_replica, max_replicas)
    assert placement.note == (None if says is None else f"worker m: {says}")
