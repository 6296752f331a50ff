"""The Kubernetes pod entry point, run as a real process: it consumes its model's queue
through a one-replica Serve application, answers the kubelet's probes, exports its metrics
on a fixed port, and on SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import httpx
import pytest

from broker.client import Broker
from loadgen.measurement import make_job, publish_jobs
from loadgen.stack_process import free_port
from tests.conftest import callbacks_in, drain_queue, wait_until
from wire.topology import Topology

pytestmark = [pytest.mark.stack, pytest.mark.slow]

POD_STOP_TIMEOUT_S = 60.0


async def test_a_worker_pod_consumes_its_model_queue_and_stops_on_sigterm(
    amqp_url: str, topology: Topology, webhook_secret: str
) -> None:
    health_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "QUEUE_PREFIX": topology.prefix,
        "WEBHOOK_SECRET": webhook_secret,
        "MODELS": "echo",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DRAIN_TIMEOUT_S": "5",
        "POD_HEALTH_PORT": str(health_port),
        "WORKER_METRICS_PORT": str(metrics_port),
    }
    broker = Broker(amqp_url, topology, ("echo",))
    await broker.connect()
    pod = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ray_workers.pod",
        "worker",
        "echo",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        jobs = [make_job("echo", n) for n in range(5)]
        await publish_jobs(broker, jobs)
        finished: set[str] = set()

        async def all_finished() -> bool:
            messages = await drain_queue(amqp_url, topology.callbacks_queue)
            finished.update(callback.event.data.id for callback in callbacks_in(messages))
            assert pod.returncode is None, "the pod exited early"
            return finished >= {j.id for j in jobs}

        await wait_until(all_finished, 120, "the pod to finish its jobs")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health_port}") as probe:

            async def ready() -> bool:
                # Serve marks the application RUNNING once the replica's health check
                # passed, which can come after its consumer already took jobs.
                return (await probe.get("/readyz")).status_code == 200

            await wait_until(ready, 30, "the pod to report ready")
            live = await probe.get("/livez")
            assert (live.status_code, live.text) == (200, "RUNNING")

        async def exported() -> bool:
            async with httpx.AsyncClient() as scraper:
                metrics = await scraper.get(f"http://127.0.0.1:{metrics_port}/metrics")
            return "ray_inferq_worker_jobs_total" in metrics.text

        # Ray exports what its workers recorded every few seconds, not at once.
        await wait_until(exported, 60, "the replica's metrics on the fixed port")
        pod.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(pod.wait(), POD_STOP_TIMEOUT_S) == 0
        _ready, consumers = await broker.queue_depth(topology.main_queue("echo"))
        assert consumers == 0
    finally:
        if pod.returncode is None:
            pod.kill()
            await pod.wait()
        await broker.close()
