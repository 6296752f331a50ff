"""The local stack: ingress, Ray Serve workers, callbacks and autoscaler on one machine.

Starts the ingress process, a local Ray cluster with one Serve application per model
plus the callback dispatcher, and the local autoscaler, which applies the models'
ScaledObjects (those `task manifests` writes to keda/, from the catalogue) to the worker
applications: they start at 0 replicas and the first job
wakes them. Runs until SIGINT/SIGTERM. Shutdown goes in the order that loses nothing:
the ingress stops taking jobs, the workers drain, then the dispatcher delivers what
they finished; Ray's processes go with `ray.shutdown()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from autoscaler.demand_events import DemandListener
from autoscaler.loop import AutoscalerMetrics, LocalAutoscaler
from autoscaler.queue_metrics import ManagementApi, management_url_from_amqp, vhost_from_amqp
from autoscaler.scaling_policy import (
    InvalidScaledObject,
    ScalingPolicy,
    load_policies,
    policy_from_scaled_object,
)
from broker.client import Broker, BrokerError
from callbacks.settings import CallbackSettings
from callbacks.signing import generate_secret
from local_stack.gpu_placement import GpuPlacement, gpu_placement
from local_stack.local_services import (
    BrokerNotAvailable,
    ensure_broker,
    ensure_management_api,
    ensure_object_store,
    ensure_redis,
)
from manifests.scaled_objects import scaled_object
from model_catalogue.catalogue import CatalogueError, load_catalogue, model_class
from ray_workers.deployment import (
    gpus_on_this_node,
    run_callback_dispatcher,
    run_model_worker,
    start_ray_and_serve,
    stop_ray_and_serve,
)
from ray_workers.settings import WorkerSettings
from settings.environment import ConfigError, Environment

logger = logging.getLogger(__name__)

READY_LINE = "inferq stack ready"
INGRESS_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StackSettings:
    """What only the local stack reads: where the ScaledObjects are, and what to run."""

    workers: WorkerSettings
    callbacks: CallbackSettings
    amqp_url: str
    management_url: str
    # None: the ScaledObjects `task manifests` writes, generated from the catalogue.
    scaled_objects_dir: Path | None
    autoscale: bool
    # Replicas per model this machine can use: the ScaledObjects' maxima are for a cluster,
    # where each replica brings its own node; here every replica shares these cores.
    local_max_replicas: int
    fixed_replicas: int
    metrics_port: int
    worker_metrics_port: int
    # Wake a model from zero on the ingress's demand events, not only on the next poll.
    push_activation: bool
    # Serve's own HTTP proxy, for the direct (no queue) path `task bench` compares with; 0 = off.
    serve_http_port: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackSettings:
        read = Environment.read(env)
        workers = WorkerSettings.from_env(env)
        # Each replica's model threads, and a core's worth for the message path (ingress,
        # broker, dispatcher): two echo replicas on 2 cores halved each one's batches and
        # cost more CPU per job than one.
        cores_worth = max(1, (os.cpu_count() or 1) // (workers.model_threads + 1))
        return cls(
            workers=workers,
            callbacks=CallbackSettings.from_env(env),
            amqp_url=read.amqp_url,
            management_url=read.rabbitmq_management_url or management_url_from_amqp(read.amqp_url),
            scaled_objects_dir=Path(read.scaledobjects_dir) if read.scaledobjects_dir else None,
            autoscale=read.local_autoscaler,
            local_max_replicas=read.local_max_replicas or cores_worth,
            fixed_replicas=read.worker_replicas,
            metrics_port=read.autoscaler_metrics_port,
            worker_metrics_port=read.worker_metrics_port,
            push_activation=read.local_push_activation,
            serve_http_port=read.serve_http_port,
        )


def _stack_env(env: Mapping[str, str]) -> dict[str, str]:
    prepared = dict(env)
    prepared.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    prepared.setdefault("HF_HUB_OFFLINE", "1")
    if not prepared.get("WEBHOOK_SECRET"):
        prepared["WEBHOOK_SECRET"] = generate_secret()
        print(
            "WEBHOOK_SECRET was unset; this session signs callbacks with:\n  "
            f"WEBHOOK_SECRET={prepared['WEBHOOK_SECRET']}",
            flush=True,
        )
    return prepared


def _start_serve(
    stack: StackSettings, policies: Mapping[str, ScalingPolicy], initial_replicas: Mapping[str, int]
) -> tuple[dict[str, ScalingPolicy], dict[str, GpuPlacement]]:
    """Start Ray, Serve, the dispatcher and the fixed-replica models; returns the policies
    capped at what this machine's GPUs hold, and where each model's replicas run."""
    start_ray_and_serve(stack.worker_metrics_port, stack.serve_http_port)
    placements = _gpu_placements(stack, gpus_on_this_node())
    capped = {
        model: _capped(policy, placements[model].max_replicas or policy.max_replicas, "its GPUs")
        for model, policy in policies.items()
    }
    run_callback_dispatcher(stack.callbacks)
    for model, replicas in initial_replicas.items():
        if replicas == 0:
            print(f"worker {model}: 0 replicas until a job arrives", flush=True)
            continue
        placement = placements[model]
        replicas = min(replicas, placement.max_replicas or replicas)
        started = time.monotonic()
        run_model_worker(
            model,
            stack.workers,
            num_replicas=placement.serve_replicas(replicas),
            num_gpus=placement.gpus_per_process,
            http=bool(stack.serve_http_port),
        )
        print(f"worker {model}: {replicas} replica(s) in {time.monotonic() - started:.1f} s", flush=True)
    return capped, placements


def _gpu_placements(stack: StackSettings, node_gpus: float) -> dict[str, GpuPlacement]:
    catalogue = load_catalogue(Path(stack.workers.model_catalogue))
    placements = {}
    for model in stack.workers.models:
        resources = catalogue.entry(model).resources
        placements[model] = gpu_placement(model, resources.gpus, node_gpus, resources.processes_per_gpu)
        if placements[model].note:
            print(placements[model].note, flush=True)
    return placements


def _stop_ingress(ingress: subprocess.Popen[bytes]) -> None:
    ingress.send_signal(signal.SIGTERM)
    try:
        ingress.wait(timeout=INGRESS_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ingress.kill()
        ingress.wait()


async def _autoscale(
    stack: StackSettings,
    policies: Mapping[str, ScalingPolicy],
    placements: Mapping[str, GpuPlacement],
    stop: asyncio.Event,
    announce_ready: Callable[[], None],
) -> None:
    """Run the local autoscaler until `stop`; ready (and said so) once it hears demand events."""
    workers = stack.workers

    async def apply(model: str, replicas: int) -> None:
        placement = placements.get(model, GpuPlacement(0.0, None, None))
        await asyncio.to_thread(
            run_model_worker,
            model,
            workers,
            placement.serve_replicas(replicas),
            placement.gpus_per_process,
            bool(stack.serve_http_port),
        )

    registry = CollectorRegistry()
    if stack.metrics_port:
        start_http_server(stack.metrics_port, addr="127.0.0.1", registry=registry)
    api = ManagementApi(stack.management_url, vhost_from_amqp(stack.amqp_url))
    events = Broker(stack.amqp_url, workers.topology, workers.models, role="autoscaler")
    try:
        autoscaler = LocalAutoscaler(
            policies,
            workers.topology.job_queues,
            workers.topology.high_queues,
            workers.topology.chunk_queues,
            api.queue_messages,
            apply,
            AutoscalerMetrics(registry),
        )
        if stack.push_activation and policies:
            await _listen_for_demand(events, autoscaler)
        announce_ready()  # after the subscription: the first job's event is heard
        await autoscaler.run(stop)
    finally:
        await events.close()
        await api.close()


async def _listen_for_demand(events: Broker, autoscaler: LocalAutoscaler) -> None:
    """Wake models on the ingress's demand events; polling alone if the broker says no."""
    try:
        await events.connect()
        await DemandListener(events, autoscaler).start()
    except BrokerError as exc:
        print(f"push activation off (models wake on polling only): {exc}", flush=True)


def _capped(policy: ScalingPolicy, local_max: int, why: str = "LOCAL_MAX_REPLICAS") -> ScalingPolicy:
    if policy.max_replicas <= local_max:
        return policy
    print(
        f"worker {policy.model}: at most {local_max} replica(s) on this machine ({why}; "
        f"its ScaledObject allows {policy.max_replicas} in a cluster)",
        flush=True,
    )
    fallback = policy.fallback_replicas
    return replace(
        policy,
        max_replicas=local_max,
        min_replicas=min(policy.min_replicas, local_max),
        fallback_replicas=None if fallback is None else min(fallback, local_max),
    )


def _catalogue_policies(stack: StackSettings) -> dict[str, ScalingPolicy]:
    """The ScaledObjects `task manifests` writes (keda/), generated from the catalogue, so a
    model added to it is autoscaled here before any manifest is regenerated."""
    workers = stack.workers
    catalogue = load_catalogue(Path(workers.model_catalogue))
    policies = {}
    for model in workers.models:
        entry = catalogue.entry(model)
        if not entry.test_only:
            policies[model] = policy_from_scaled_object(
                scaled_object(entry), f"{catalogue.source}: model {model!r}"
            )
    return policies


def _scaling_plan(stack: StackSettings) -> tuple[dict[str, ScalingPolicy], dict[str, int]]:
    """Models with a ScaledObject start at 0 and are autoscaled; the rest run fixed replicas."""
    if not stack.autoscale:
        policies = {}
    elif stack.scaled_objects_dir is None:
        policies = _catalogue_policies(stack)
    else:
        policies = load_policies(stack.scaled_objects_dir)
    policies = {
        model: _capped(policy, stack.local_max_replicas)
        for model, policy in policies.items()
        if model in stack.workers.models
    }
    initial = {model: 0 if model in policies else stack.fixed_replicas for model in stack.workers.models}
    return policies, initial


async def _run_until_signal(
    stack: StackSettings,
    policies: Mapping[str, ScalingPolicy],
    placements: Mapping[str, GpuPlacement],
    announce_ready: Callable[[], None],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await _autoscale(stack, policies, placements, stop, announce_ready)
    print("stopping: ingress, then workers (drain), then callbacks", flush=True)


def _check_model_classes(stack: StackSettings) -> None:
    """Every served model's class imports and is a model, before anything starts (the
    replicas would otherwise fail one by one, minutes later, in Ray's logs)."""
    catalogue = load_catalogue(Path(stack.workers.model_catalogue))
    for model in stack.workers.models:
        model_class(catalogue.entry(model))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per autoscaler poll otherwise
    try:
        env = _stack_env(os.environ)
        env.update(ensure_object_store(env))
        stack = StackSettings.from_env(env)
        _check_model_classes(stack)
        ensure_broker(stack.amqp_url)
        if stack.autoscale:
            ensure_management_api(stack.management_url)
        if stack.workers.redis_url:
            ensure_redis(stack.workers.redis_url)
        policies, initial = _scaling_plan(stack)
    except (ConfigError, CatalogueError, BrokerNotAvailable, InvalidScaledObject) as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    # Ray's own processes read these from the environment they inherit; the webhook secret
    # reaches the dispatcher in its settings and no other process.
    os.environ.update({k: env[k] for k in ("RAY_USAGE_STATS_ENABLED", "HF_HUB_OFFLINE")})
    os.environ.pop("WEBHOOK_SECRET", None)
    ingress_env = {k: v for k, v in env.items() if k != "WEBHOOK_SECRET"}
    ingress = subprocess.Popen([sys.executable, "-m", "ingress"], env=ingress_env)
    try:
        started = time.monotonic()
        policies, placements = _start_serve(stack, policies, initial)
        scaling = ", ".join(
            f"{m} autoscaled from 0" if m in policies else f"{m} {n} fixed" for m, n in initial.items()
        )

        def announce_ready() -> None:
            print(
                f"{READY_LINE} in {time.monotonic() - started:.1f} s: ingress on "
                f"http://{env.get('INGRESS_HOST', '127.0.0.1')}:{env.get('INGRESS_PORT', '8000')}; "
                f"{scaling}; Ctrl-C stops",
                flush=True,
            )

        asyncio.run(_run_until_signal(stack, policies, placements, announce_ready))
    except KeyboardInterrupt:
        print("interrupted while starting", flush=True)
    finally:
        _stop_ingress(ingress)
        stop_ray_and_serve()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
