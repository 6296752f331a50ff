"""Where a model's replicas run on one machine: on the GPUs its catalogue entry asks for,
capped at what the machine holds, or on the CPU when it has too few."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from local_stack.gpu_placement import gpu_placement
from rehearsal.image_stage import DOCKERFILE, image_env, stage_body


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


def test_given_a_gpu_pod_where_cuda_sees_no_device_then_it_stops_saying_why() -> None:
    """Cluster finding 4: on GKE the driver is mounted at /usr/local/nvidia and nothing put its
    libraries on the loader path: Ray saw 0 GPUs and MiniLM fell back to the CPU unnoticed.
    A pod asked for a GPU now refuses to start without one (this machine has none)."""
    env = {**os.environ, "WORKER_NUM_GPUS": "1", "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"}
    done = subprocess.run(
        [sys.executable, "-m", "ray_workers.pod", "worker", "echo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 2
    assert "WORKER_NUM_GPUS=1.0 but CUDA sees 0 device(s)" in done.stderr
    assert "LD_LIBRARY_PATH" in done.stderr


def test_the_cuda_image_puts_the_nodes_driver_on_the_loader_path() -> None:
    cuda = image_env(stage_body(DOCKERFILE.read_text(), "cuda"))

    assert "/usr/local/nvidia/lib64" in cuda["LD_LIBRARY_PATH"].split(":")
