"""Where a model's replicas run on one machine: on the GPUs its catalogue entry asks for,
capped at what the machine holds, or on the CPU when it has too few."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from local_stack.gpu_placement import gpu_placement
from ray_workers.settings import WorkerSettings
from rehearsal.image_stage import DOCKERFILE, image_env, stage_body
from settings.environment import ConfigError


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


@pytest.mark.parametrize(
    ("node", "replicas", "serve_replicas", "each", "says"),
    [
        (1.0, 1, 4, 0.25, "1 GPU(s) per replica, at most 1 on 1 GPU(s), 4 processes sharing each"),
        (2.0, 2, 8, 0.25, "1 GPU(s) per replica, at most 2 on 2 GPU(s), 4 processes sharing each"),
        (0.0, 3, 3, 0.0, "asks for 1 GPU(s), this machine has 0: it runs on CPU"),
    ],
)
def test_a_replica_sharing_its_gpu_is_that_many_serve_replicas_each_on_a_share(
    node: float, replicas: int, serve_replicas: int, each: float, says: str
) -> None:
    """A replica means the same here as a pod under KEDA: the autoscaler's count of
    one-GPU replicas becomes processes_per_gpu Serve replicas each, on a quarter GPU."""
    placement = gpu_placement("m", 1, node, processes_per_gpu=4)

    assert (placement.serve_replicas(replicas), placement.gpus_per_process) == (serve_replicas, each)
    assert placement.note == f"worker m: {says}"


@pytest.mark.parametrize(
    ("env", "processes", "each"),
    [
        ({"WORKER_NUM_GPUS": "1", "WORKER_PROCESSES_PER_GPU": "4"}, 4, 0.25),
        ({"WORKER_NUM_GPUS": "1"}, 1, 1.0),
        # kind's overlay runs a GPU model on CPU with WORKER_NUM_GPUS=0: one process.
        ({"WORKER_NUM_GPUS": "0", "WORKER_PROCESSES_PER_GPU": "4"}, 1, 0.0),
    ],
)
def test_a_gpu_pod_runs_its_processes_on_shares_of_its_gpu(
    env: dict[str, str], processes: int, each: float
) -> None:
    settings = WorkerSettings.from_env({"MODELS": "echo", **env})

    assert settings.pod_processes() == (processes, each)


def test_a_pod_refuses_a_process_count_out_of_range() -> None:
    with pytest.raises(ConfigError, match="WORKER_PROCESSES_PER_GPU"):
        WorkerSettings.from_env({"MODELS": "echo", "WORKER_NUM_GPUS": "1", "WORKER_PROCESSES_PER_GPU": "0"})


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


RAY_SHARED_GPU_SCRIPT = """
import asyncio, os, uuid
import ray
from ray import serve
from broker.client import Broker
from ray_workers.deployment import run_model_worker, start_ray_and_serve, stop_ray_and_serve, worker_app_name
from ray_workers.settings import WorkerSettings

prefix = f"t-{uuid.uuid4().hex[:8]}."
settings = WorkerSettings.from_env({**os.environ, "MODELS": "echo", "QUEUE_PREFIX": prefix})
processes, each = settings.pod_processes()
start_ray_and_serve(num_gpus=1)  # as a GPU pod names its one GPU to Ray
try:
    run_model_worker("echo", settings, num_replicas=processes, num_gpus=each)
    deployment = serve.status().applications[worker_app_name("echo")].deployments["ModelWorker-echo"]
    print("running", deployment.replica_states.get("RUNNING", 0))
    print("gpus left", ray.available_resources().get("GPU", 0.0))
finally:
    stop_ray_and_serve()


    async def delete_topology() -> None:
        broker = Broker(settings.amqp_url, settings.topology, settings.models)
        await broker.connect()
        await broker.delete_topology()
        await broker.close()

    asyncio.run(delete_topology())
"""


def test_a_gpu_pods_processes_all_start_on_its_one_gpu_and_reserve_all_of_it() -> None:
    """What `ray_workers.pod` does with WORKER_PROCESSES_PER_GPU=4 on a one-GPU node (named
    to Ray, as the pod does; CUDA itself is not needed to place replicas)."""
    env = {**os.environ, "WORKER_NUM_GPUS": "1", "WORKER_PROCESSES_PER_GPU": "4"}
    done = subprocess.run(
        [sys.executable, "-c", RAY_SHARED_GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=180
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "running 4\n" in done.stdout and "gpus left 0.0\n" in done.stdout, done.stdout
