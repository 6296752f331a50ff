"""`python -m ray_workers.pod worker <model>` | `... pod callbacks`: one Kubernetes pod.

Under KEDA a pod is one replica: it starts a node-local Ray instance, runs one Serve
replica of one model's worker (on a GPU, WORKER_PROCESSES_PER_GPU of them sharing it; or
of the callback dispatcher), and on SIGTERM (a
scale-down) deletes the application, which drains the replica's batch before the pod
exits; `terminationGracePeriodSeconds` must exceed `DRAIN_TIMEOUT_S` (cluster/ does).
The kubelet probes `/livez` and `/readyz` (`ray_workers.pod_health`, on
POD_HEALTH_PORT); Ray exports the replica's metrics on WORKER_METRICS_PORT.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading

from callbacks.settings import CallbackSettings
from ray_workers.pod_health import PodHealth
from ray_workers.settings import WorkerSettings
from settings.environment import ConfigError, Environment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pod", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["worker", "callbacks"])
    parser.add_argument("model", nargs="?", help="the model, for role worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Each role reads only its own settings: a model pod needs no webhook secret.
        settings: WorkerSettings | CallbackSettings
        read = Environment.read(os.environ)
        if args.role == "worker":
            settings = WorkerSettings.from_env(os.environ)
            if args.model not in settings.models:
                raise ConfigError(f"model {args.model!r} is not in MODELS {list(settings.models)}")
        else:
            settings = CallbackSettings.from_env(os.environ)
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    # Imported here: Ray's import takes seconds and `--help` or a bad setting should not wait.
    from ray_workers.deployment import (
        DISPATCHER_APP,
        application_status,
        run_callback_dispatcher,
        run_model_worker,
        start_ray_and_serve,
        stop_ray_and_serve,
        worker_app_name,
    )

    gpus = math.ceil(read.worker_num_gpus) if args.role == "worker" else 0
    if gpus:
        from ray_workers.models.cuda import cuda_devices

        found = cuda_devices()
        if found < gpus:
            print(
                f"cannot start: WORKER_NUM_GPUS={read.worker_num_gpus} but CUDA sees {found} device(s): "
                "is the driver's lib64 on LD_LIBRARY_PATH (GKE: /usr/local/nvidia/lib64) and "
                "nvidia.com/gpu in the limits?",
                file=sys.stderr,
            )
            return 2
    # Metrics on a fixed port of the pod's IP (RAY_NODE_IP), so a PodMonitor can scrape them;
    # the GPUs named, not left to Ray's detection (which can miss a mounted driver).
    start_ray_and_serve(read.worker_metrics_port, node_ip=read.ray_node_ip, num_gpus=gpus)
    app = worker_app_name(args.model) if args.role == "worker" else DISPATCHER_APP
    health = PodHealth(read.pod_health_host, read.pod_health_port, lambda: application_status(app))
    health.start()
    # After ray.init, which installs a SIGTERM handler that exits at once: a scale-down
    # must drain instead, even one that arrives while the replica is still starting.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    try:
        if isinstance(settings, WorkerSettings):
            processes, gpus_each = settings.pod_processes()
            run_model_worker(args.model, settings, num_replicas=processes, num_gpus=gpus_each)
        else:
            run_callback_dispatcher(settings)
        stop.wait()
    finally:
        stop_ray_and_serve()  # graceful: the replica drains its batch
        health.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
