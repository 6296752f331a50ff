"""Scale to zero and back, on the real stack (real broker, real Ray), KEDA e2e style:
named phases, each with its own timeout and assertion.

The ScaledObjects are the shipped keda/ files with small timings: echo's with an
activationValue of 2 (phase 1), and echo's retargeted at the `synthetic` model with the
shipped activationValue 0 (phases 2-5), so the rules under test are the shipped ones
and the suite stays fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadgen.callback_receiver import CallbackReceiver
from loadgen.stack_process import StackProcess
from manifests.scaled_objects import queues_pattern
from tests.conftest import wait_until
from wire.job_chunk import CHUNK_JOBS
from wire.topology import Topology

pytestmark = [pytest.mark.stack, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
POLLING_S, COOLDOWN_S, VALUE, ECHO_ACTIVATION, MAX_REPLICAS = 1, 8, 4, 2, 3
# The high-backlog trigger's jobs per replica: a high job counts as VALUE normal ones.
HIGH_VALUE = 1
# The management API refreshes queue figures every 5 s: detection waits for that too.
STATS_LAG_S = 5.0


def _test_scaled_object(model: str, activation: int) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "keda" / "scaledobject-echo.yaml").read_text())
    spec = doc["spec"]
    doc["metadata"]["name"] = f"worker-{model}"
    doc["metadata"]["labels"]["inferq.dev/model"] = model
    spec.update(pollingInterval=POLLING_S, cooldownPeriod=COOLDOWN_S, maxReplicaCount=MAX_REPLICAS)
    spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
        "stabilizationWindowSeconds"
    ] = 2
    spec["triggers"][0]["metadata"].update(
        queueName=queues_pattern(Topology().job_queues(model)),
        value=str(VALUE),
        activationValue=str(activation),
    )
    spec["triggers"][1]["metadata"].update(
        queueName=queues_pattern(Topology().high_queues(model)), value=str(HIGH_VALUE)
    )
    spec["triggers"][2]["metadata"].update(
        queueName=queues_pattern(Topology().chunk_queues(model)), value=f"{VALUE / CHUNK_JOBS:g}"
    )
    for push in spec["triggers"][3:]:
        push["metadata"]["model"] = model
    return doc


class Stack:
    def __init__(self, process: StackProcess, client: httpx.AsyncClient, receiver: CallbackReceiver) -> None:
        self.process, self.client, self.receiver = process, client, receiver

    async def gauge(self, name: str, model: str = "synthetic") -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{self.process.metrics_port}/metrics")).text
        match = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', text, re.MULTILINE)
        return float(match.group(1)) if match else -1.0

    async def replicas(self, model: str = "synthetic") -> int:
        return int(await self.gauge("inferq_autoscaler_replicas", model))

    async def submit(
        self, count: int, sleep_ms: int = 0, model: str = "synthetic", priority: str = "normal"
    ) -> set[str]:
        ids = set()
        job_input = {"sleep_ms": sleep_ms} if model == "synthetic" else "ping"
        body = {"input": job_input, "callback_url": self.receiver.url, "priority": priority}
        for _ in range(count):
            response = await self.client.post(f"/v1/models/{model}/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.add(response.json()["id"])
        return ids

    def called_back(self) -> set[str]:
        return {r.event["data"]["id"] for r in self.receiver.received}


async def test_scale_from_zero_to_n_and_back_to_zero(
    amqp_url: str, topology: Topology, receiver: CallbackReceiver, webhook_secret: str, tmp_path: Path
) -> None:
    for model, activation in (("echo", ECHO_ACTIVATION), ("synthetic", 0)):
        scaled_object = yaml.safe_dump(_test_scaled_object(model, activation))
        (tmp_path / f"scaledobject-{model}.yaml").write_text(scaled_object)
    process = StackProcess(
        {
            **os.environ,
            "AMQP_URL": amqp_url,
            "QUEUE_PREFIX": topology.prefix,
            "WEBHOOK_SECRET": webhook_secret,
            "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
            "MODELS": "echo",
            "ENABLE_TEST_MODELS": "1",
            "SCALEDOBJECTS_DIR": str(tmp_path),
            "LOCAL_MAX_REPLICAS": str(MAX_REPLICAS),
            "DRAIN_TIMEOUT_S": "5",
            "BATCH_MAX_SIZE": "1",
            # Polling alone: a demand event would wake echo below its activationValue.
            "LOCAL_PUSH_ACTIVATION": "0",
        }
    )
    try:
        await process.start()
        async with httpx.AsyncClient(base_url=process.base_url, timeout=30) as client:
            stack = Stack(process, client, receiver)
            await _phases(stack)
    finally:
        assert await process.stop() == 0, process.output()[-3000:]


async def _phases(stack: Stack) -> None:
    # Phase 0, at rest: no replicas.
    await wait_until(lambda: _is(stack.replicas(), 0), 10, "0 replicas at rest")

    # Phase 1, a backlog at echo's activationValue (2): the metric is seen, nothing moves.
    await stack.submit(ECHO_ACTIVATION, model="echo")
    await wait_until(
        lambda: _is(stack.gauge("inferq_autoscaler_queue_messages", "echo"), ECHO_ACTIVATION),
        STATS_LAG_S + 10,
        "the autoscaler to see the echo backlog",
    )
    seen_at = time.monotonic()
    while time.monotonic() - seen_at < 3 * POLLING_S:  # three more polls
        assert await stack.replicas("echo") == 0, "a backlog at activationValue must not wake the workers"
        await asyncio.sleep(0.2)  # the polling interval of this invariant check, bounded above

    # Phase 2, synthetic jobs above its activationValue (0): 0 -> 1 and every job completes.
    woke_at = time.monotonic()
    first = await stack.submit(3)
    await wait_until(lambda: _at_least(stack.replicas(), 1), STATS_LAG_S + 20, ">= 1 replica")
    activation_s = time.monotonic() - woke_at
    await wait_until(lambda: first <= stack.called_back(), 30, "the first jobs' callbacks")
    from_zero_s = time.monotonic() - woke_at

    # Phase 2b, three high-priority jobs: as normal jobs they would want ceil(3 / 4) = 1
    # replica; the high-backlog trigger counts them against HIGH_VALUE and scales out.
    # Long enough (18 s on one replica) to outlast the statistics' lag and a loaded apply.
    high_at = time.monotonic()
    high = await stack.submit(3, sleep_ms=6000, priority="high")
    try:
        await wait_until(
            lambda: _at_least(stack.replicas(), 2), STATS_LAG_S + 45, ">= 2 replicas, 3 high jobs"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.process.output()[-4000:]}") from None
    high_scale_s = time.monotonic() - high_at
    await wait_until(lambda: high <= stack.called_back(), 45, "the high jobs' callbacks")

    # Phase 3, a larger burst scales out to N (ceil(backlog / value), capped at the max).
    burst = await stack.submit(40, sleep_ms=300)
    await wait_until(lambda: _at_least(stack.replicas(), 2), STATS_LAG_S + 30, ">= 2 replicas")
    await wait_until(lambda: burst <= stack.called_back(), 90, "the burst's callbacks")

    # Phase 4, busy replicas are never scaled down: a job longer than the cooldown runs
    # with an empty ready queue, and its replica stays until it is done.
    long_job = await stack.submit(1, sleep_ms=(COOLDOWN_S + 4) * 1000)
    started = time.monotonic()
    while long_job - stack.called_back():
        assert await stack.replicas() >= 1, "scaled to zero with a job in flight"
        assert time.monotonic() - started < COOLDOWN_S + 30, "the long job did not finish"
        await asyncio.sleep(0.5)  # the polling interval of this invariant check, bounded above

    # Phase 5, idle: back to 0 once the cooldown has passed.
    await wait_until(lambda: _is(stack.replicas(), 0), COOLDOWN_S + STATS_LAG_S + 20, "back to 0")
    assert "autoscaler synthetic: 0 -> 1 replicas" in stack.process.output()
    print(
        f"\nscale from zero: activation seen after {activation_s:.1f} s, first callbacks after "
        f"{from_zero_s:.1f} s (pollingInterval {POLLING_S} s, stats lag up to {STATS_LAG_S:.0f} s); "
        f"3 high-priority jobs scaled 1 -> 2+ replicas in {high_scale_s:.1f} s"
    )


async def _is(value: Any, expected: float) -> bool:
    return bool(await value == expected)


async def _at_least(value: Any, expected: float) -> bool:
    return bool(await value >= expected)
