"""`python -m ray_workers.local_stack` (`task up`): the whole pipeline on one machine.

Starts the ingress process, a local Ray cluster with one Serve application per model
plus the callback dispatcher, and runs until SIGINT/SIGTERM. Shutdown goes in the
order that loses nothing: the ingress stops taking jobs, the workers drain, then the
dispatcher delivers what they finished; Ray's processes go with `ray.shutdown()`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

from contract.config import DEFAULT_AMQP_URL, ConfigError
from ray_workers.local_broker import BrokerNotAvailable, ensure_broker
from ray_workers.settings import WorkerSettings
from ray_workers.signing import generate_secret

logger = logging.getLogger(__name__)

READY_LINE = "inferq stack ready"
INGRESS_STOP_TIMEOUT_S = 30.0


def _stack_env(env: Mapping[str, str]) -> dict[str, str]:
    prepared = dict(env)
    prepared.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prepared.setdefault("HF_HUB_OFFLINE", "1")
    if not prepared.get("WEBHOOK_SECRET"):
        prepared["WEBHOOK_SECRET"] = generate_secret()
        print(
            f"WEBHOOK_SECRET was unset; this session signs callbacks with:\n  "
            f"WEBHOOK_SECRET={prepared['WEBHOOK_SECRET']}",
            flush=True,
        )
    return prepared


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    stop.wait()


def _start_serve(settings: WorkerSettings) -> None:
    import ray
    from ray import serve

    from ray_workers.deployment import run_callback_dispatcher, run_model_worker

    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    serve.start(proxy_location="Disabled")
    run_callback_dispatcher(settings)
    for model in settings.models:
        started = time.monotonic()
        run_model_worker(model, settings)
        print(f"worker {model}: 1 replica ready in {time.monotonic() - started:.1f} s", flush=True)


def _stop_serve(settings: WorkerSettings) -> None:
    import ray
    from ray import serve

    from ray_workers.deployment import DISPATCHER_APP, worker_app_name

    if not ray.is_initialized():
        return
    for model in settings.models:
        serve.delete(worker_app_name(model))
    serve.delete(DISPATCHER_APP)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


def _stop_ingress(ingress: subprocess.Popen[bytes]) -> None:
    ingress.send_signal(signal.SIGTERM)
    try:
        ingress.wait(timeout=INGRESS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ingress.kill()
        ingress.wait()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        env = _stack_env(os.environ)
        settings = WorkerSettings.from_env(env)
        ensure_broker(env.get("AMQP_URL", DEFAULT_AMQP_URL))
    except (ConfigError, BrokerNotAvailable) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    # Ray's own processes read these from the environment they inherit.
    os.environ.update({k: env[k] for k in ("RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")})
    ingress = subprocess.Popen([sys.executable, "-m", "ingress"], env=env)
    try:
        started = time.monotonic()
        _start_serve(settings)
        print(
            f"{READY_LINE} in {time.monotonic() - started:.1f} s: ingress on "
            f"http://{env.get('INGRESS_HOST', '127.0.0.1')}:{env.get('INGRESS_PORT', '8000')}, "
            f"models {', '.join(settings.models)}; Ctrl-C stops",
            flush=True,
        )
        _wait_for_signal()
        print("stopping: ingress, then workers (drain), then callbacks", flush=True)
    finally:
        _stop_ingress(ingress)
        _stop_serve(settings)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
