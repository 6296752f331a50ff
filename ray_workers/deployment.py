"""The one home of Ray: starting and stopping Ray and Serve, and the Serve deployments
that host a JobWorker or the CallbackDispatcher.

Each replica pulls its own work from RabbitMQ (no requests come through Serve's
router, whose per-replica `max_ongoing_requests` would throttle a queue consumer), so
Serve's role is placement, health checking, restarts and replica counts. One Serve
application per model lets each scale on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.util import metrics as ray_metrics
from starlette.requests import Request

from callbacks.delivery_metrics import CALLBACK_SERIES, DeliveryMetrics
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from metrics.series import SeriesTable
from policies.heap_collection import settle_startup_heap
from ray_workers.job_worker import JobWorker
from ray_workers.models.registry import load_model
from ray_workers.settings import WorkerSettings
from ray_workers.worker_metrics import SERIES, WorkerMetrics

logger = logging.getLogger(__name__)

DISPATCHER_APP = "callbacks"


class ReplicaUnhealthy(Exception):
    """Raised from check_health so Serve restarts the replica."""


class RaySink:
    """A table of series (`metrics.series`) through Ray's metrics API: Ray exports
    them, in Prometheus format, on the node's metrics port (`WORKER_METRICS_PORT`), named
    `ray_<name>` (`ray_inferq_worker_*`, `ray_inferq_callbacks_*`)."""

    def __init__(self, table: SeriesTable) -> None:
        self._series: dict[str, ray_metrics.Histogram | ray_metrics.Counter | ray_metrics.Gauge] = {}
        for key, series in table.items():
            if series.kind == "histogram":
                self._series[key] = ray_metrics.Histogram(
                    series.name, series.help, list(map(float, series.buckets)), series.labels
                )
            elif series.kind == "counter":
                self._series[key] = ray_metrics.Counter(series.name, series.help, series.labels)
            else:
                self._series[key] = ray_metrics.Gauge(series.name, series.help, series.labels)

    def record(self, key: str, value: float, labels: Mapping[str, str]) -> None:
        metric = self._series[key]
        tags = dict(labels)
        if isinstance(metric, ray_metrics.Histogram):
            metric.observe(value, tags)
        elif isinstance(metric, ray_metrics.Counter):
            metric.inc(value, tags)
        else:
            metric.set(value, tags)


def worker_app_name(model: str) -> str:
    return f"worker-{model}"


@serve.deployment(health_check_period_s=5, health_check_timeout_s=10)
class ModelWorkerDeployment:
    """A replica: loads the model once, then consumes the model's queue until shut down."""

    # Ray actors run `async def __init__`; the worker's tasks live on the replica's loop.
    async def __init__(self, model_name: str, settings: WorkerSettings) -> None:  # type: ignore[misc]
        logging.basicConfig(level=logging.INFO)
        started = time.monotonic()
        self._model = await asyncio.to_thread(load_model, model_name, settings.model_catalogue)
        logger.info("model %s loaded in %.2f s", model_name, time.monotonic() - started)
        self._worker = JobWorker(self._model, settings, metrics=WorkerMetrics(RaySink(SERIES)))
        self._drain_timeout_s = settings.drain_timeout_s
        # Before it consumes: objects alive at the freeze are left out of every later collection.
        settle_startup_heap()
        await self._worker.start()

    async def check_health(self) -> None:
        # Liveness only: a broker outage must not restart the replica and reload its model.
        if not self._worker.is_alive:
            raise ReplicaUnhealthy("the job loop stopped")

    async def __call__(self, request: Request) -> Any:
        """The direct path: one input over Serve's HTTP proxy, no queue, no callback.

        Served only when the stack runs a proxy (`SERVE_HTTP_PORT`); `task bench` uses
        it as the baseline the queued pipeline's latency is compared with.
        """
        prepared = self._model.prepare(await request.json(), 1)
        return (await asyncio.to_thread(self._model.predict, [prepared]))[0]

    # Serve's documented shutdown hook: it awaits `__del__` during graceful shutdown,
    # inside `graceful_shutdown_timeout_s`, so the batch in flight can finish.
    async def __del__(self) -> None:
        await self._worker.stop(self._drain_timeout_s)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=10)
class CallbackDispatcherDeployment:
    async def __init__(self, settings: CallbackSettings) -> None:  # type: ignore[misc]
        logging.basicConfig(level=logging.INFO)
        self._dispatcher = CallbackDispatcher(settings, metrics=DeliveryMetrics(RaySink(CALLBACK_SERIES)))
        self._drain_timeout_s = settings.drain_timeout_s
        settle_startup_heap()
        await self._dispatcher.start()

    async def check_health(self) -> None:
        """Answering is the liveness signal: the replica's loop runs. A broker outage heals by
        reconnecting and must not restart the dispatcher."""
        if not self._dispatcher.is_ready:
            logger.warning("callback dispatcher waiting for the broker to come back")

    async def __del__(self) -> None:
        await self._dispatcher.stop(self._drain_timeout_s)


def _options(
    drain_timeout_s: float, num_replicas: int, num_gpus: float, env: dict[str, str]
) -> dict[str, Any]:
    return {
        "num_replicas": num_replicas,
        # Replicas mostly wait on the broker; CPU is shared by the OS, GPUs are reserved.
        # Ray pins OMP_NUM_THREADS to 1 for an actor without num_cpus, which ran MiniLM on
        # one core of two: the model's threads are a setting of their own instead.
        "ray_actor_options": {
            "num_cpus": 0,
            "num_gpus": num_gpus,
            "runtime_env": {"env_vars": env},
        },
        "graceful_shutdown_timeout_s": drain_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": 0.1,
    }


def run_model_worker(
    model: str, settings: WorkerSettings, num_replicas: int = 1, num_gpus: float = 0, http: bool = False
) -> None:
    """Deploy, or redeploy with a new replica count, the worker application of one model.

    Serve takes no `num_replicas=0`: zero replicas means no application, and deleting it
    shuts its replicas down gracefully (each drains its batch in `__del__`).
    """
    if num_replicas == 0:
        if worker_app_name(model) in serve.status().applications:
            serve.delete(worker_app_name(model))
        return
    app = ModelWorkerDeployment.options(  # type: ignore[attr-defined]
        name=f"ModelWorker-{model}",
        **_options(
            settings.drain_timeout_s,
            num_replicas,
            num_gpus,
            {"OMP_NUM_THREADS": str(settings.model_threads)},
        ),
    ).bind(model, settings)
    serve.run(app, name=worker_app_name(model), route_prefix=f"/direct/{model}" if http else None)


def run_callback_dispatcher(settings: CallbackSettings) -> None:
    app = CallbackDispatcherDeployment.options(  # type: ignore[attr-defined]
        **_options(settings.drain_timeout_s, 1, 0, {})
    ).bind(settings)
    serve.run(app, name=DISPATCHER_APP, route_prefix=None)


def start_ray_and_serve(
    metrics_export_port: int = 0, http_port: int = 0, node_ip: str = "127.0.0.1", num_gpus: int | None = None
) -> None:
    """A node-local Ray instance at `node_ip` (loopback on one machine, the pod's IP in a
    pod) and Serve on it; Serve's HTTP proxy only when `http_port` is set (the direct path
    `task bench` compares with). Ray exports the workers' metrics in Prometheus format on
    `metrics_export_port` when it is set: on loopback when `node_ip` is loopback (Ray's
    reporter agent), on every interface otherwise. `num_gpus` set: the node's GPUs, named
    rather than detected."""
    ray.init(
        num_gpus=num_gpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        _node_ip_address=node_ip,
        _metrics_export_port=metrics_export_port or None,
    )
    if http_port:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
    else:
        serve.start(proxy_location="Disabled")


def gpus_on_this_node() -> float:
    """The GPUs Ray found on this machine (0 without any)."""
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return float(resources.get("GPU", 0.0))


def application_status(app: str) -> str:
    """Serve's status of one application (RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY,
    ...), or NOT_STARTED before it is deployed."""
    running = serve.status().applications.get(app)
    return "NOT_STARTED" if running is None else running.status.value


def stop_ray_and_serve() -> None:
    """Delete the worker applications first (each replica drains its batch), then the
    dispatcher (it delivers what they finished), then stop Serve and Ray."""
    if not ray.is_initialized():
        return
    running = serve.status().applications
    for app in running:
        if app != DISPATCHER_APP:
            serve.delete(app)
    if DISPATCHER_APP in running:
        serve.delete(DISPATCHER_APP)
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
