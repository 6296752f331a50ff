"""The real stack: ingress process + Ray Serve replicas + dispatcher, through HTTP, with a
replica killed mid-batch. Slow (starts Ray), so it is one test covering the whole path."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from broker.client import Broker
from loadgen.callback_receiver import CallbackReceiver
from loadgen.stack_process import StackProcess
from tests.conftest import wait_until
from wire.topology import Topology

pytestmark = [pytest.mark.stack, pytest.mark.slow]

DRAIN_TIMEOUT_S = 10


def _pids_with(marker: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


async def _wait_taken(amqp_url: str, topology: Topology, model: str) -> None:
    probe = Broker(amqp_url, topology, ())
    await probe.connect()
    try:

        async def taken() -> bool:
            ready, consumers = await probe.queue_depth(topology.main_queue(model))
            return ready == 0 and consumers > 0

        await wait_until(taken, 30, f"a {model} replica to take its job")
    finally:
        await probe.close()


async def test_given_the_stack_when_a_replica_is_killed_mid_batch_then_every_job_calls_back(
    amqp_url: str, topology: Topology, receiver: CallbackReceiver, webhook_secret: str
) -> None:
    stack = StackProcess(
        {
            **os.environ,
            "AMQP_URL": amqp_url,
            "QUEUE_PREFIX": topology.prefix,
            "WEBHOOK_SECRET": webhook_secret,
            "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
            "MODELS": "echo,embed-minilm",
            "ENABLE_TEST_MODELS": "1",
            "DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        }
    )
    try:
        await stack.start()
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
            jobs = {}
            for model, job_input in [
                ("synthetic", {"sleep_ms": 4000}),
                ("echo", {"x": 1}),
                ("embed-minilm", {"texts": ["hello", "world"]}),
            ]:
                response = await client.post(
                    f"/v1/models/{model}/jobs", json={"input": job_input, "callback_url": receiver.url}
                )
                assert response.status_code == 202, response.text
                jobs[response.json()["id"]] = model
            assert (await client.get("/v1/models")).json()["models"][0]["name"] == "echo"

        await _wait_taken(amqp_url, topology, "synthetic")  # the 4 s job is now in a batch
        for pid in _pids_with("ServeReplica:worker-synthetic"):
            os.kill(pid, signal.SIGKILL)

        received = list(await receiver.wait_for(3, timeout_s=120))

        # The replicas' batch metrics reach Prometheus through Ray's exporter.
        async def batch_metrics_exported() -> bool:
            async with httpx.AsyncClient() as http:
                text = (await http.get(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics")).text
            return "ray_inferq_worker_batch_size_bucket" in text and 'model="synthetic"' in text

        await wait_until(batch_metrics_exported, 30, "worker batch metrics on Ray's metrics port")

        # Drain: a stop during a batch lets the batch finish and its callback go out.
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
            response = await client.post(
                "/v1/models/synthetic/jobs", json={"input": {"sleep_ms": 2000}, "callback_url": receiver.url}
            )
        draining_id = response.json()["id"]
        await _wait_taken(amqp_url, topology, "synthetic")
    finally:
        stop_started = time.monotonic()
        exit_code = await stack.stop()
        stop_s = time.monotonic() - stop_started

    by_id = {r.event["data"]["id"]: r for r in received}
    assert set(by_id) == set(jobs), stack.output()[-3000:]
    assert all(r.verified and r.event["type"] == "job.succeeded" for r in received)
    embed_id = next(job_id for job_id, model in jobs.items() if model == "embed-minilm")
    assert len(by_id[embed_id].event["data"]["output"]["embeddings"]) == 2
    ids = [r.event["data"]["id"] for r in receiver.received]
    print(
        f"\nkill -9 mid-batch: {len(jobs)} jobs, {len(ids) - len(set(ids))} duplicate callbacks; "
        f"stop with a batch in flight took {stop_s:.1f} s (drain timeout {DRAIN_TIMEOUT_S} s)"
    )
    assert draining_id in ids, "the batch in flight at stop was lost"
    assert stop_s < DRAIN_TIMEOUT_S + 20
    assert exit_code == 0, stack.output()[-3000:]
    assert "stopped" in stack.output()
    assert not _pids_with("ray::") and not _pids_with("gcs_server"), "Ray processes left behind"
