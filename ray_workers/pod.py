"""`python -m ray_workers.pod worker <model>` | `... pod callbacks`: one Kubernetes pod.

Under KEDA a pod is one replica: it starts a node-local Ray instance, runs one Serve
replica of one model's worker (or of the callback dispatcher), and on SIGTERM (a
scale-down) deletes the application, which drains the replica's batch before the pod
exits. `terminationGracePeriodSeconds` must exceed `DRAIN_TIMEOUT_S` (cluster/ does).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from contract.config import ConfigError, env_float
from ray_workers.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pod", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["worker", "callbacks"])
    parser.add_argument("model", nargs="?", help="the model, for role worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings.from_env(os.environ)
        num_gpus = env_float(os.environ, "WORKER_NUM_GPUS", 0.0)
        if args.role == "worker" and args.model not in settings.models:
            raise ConfigError(f"model {args.model!r} is not in MODELS {list(settings.models)}")
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from ray_workers.deployment import (
        DISPATCHER_APP,
        run_callback_dispatcher,
        run_model_worker,
        worker_app_name,
    )

    ray.init(include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    # After ray.init, which installs a SIGTERM handler that exits at once: a scale-down
    # must drain instead, even one that arrives while the replica is still starting.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    serve.start(proxy_location="Disabled")
    app = worker_app_name(args.model) if args.role == "worker" else DISPATCHER_APP
    try:
        if args.role == "worker":
            run_model_worker(args.model, settings, num_replicas=1, num_gpus=num_gpus)
        else:
            run_callback_dispatcher(settings)
        stop.wait()
    finally:
        serve.delete(app)  # graceful: the replica drains its batch
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
