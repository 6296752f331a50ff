"""A user's model, from a package outside the platform's source tree (built in a temporary
directory and pip-installed into the venv), run by `task up`
(the local stack) from nothing but its catalogue entry: the ingress enforces its input
schema before anything is queued, the local autoscaler wakes it from zero by the
ScaledObject its `scaling` section implies (no SCALEDOBJECTS_DIR), its jobs are batched
as its `batching` section says, and every callback verifies with the Standard Webhooks
library. Named phases, each with its own bound."""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
import uuid
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest

from loadgen.callback_receiver import CallbackReceiver
from loadgen.stack_process import StackProcess
from tests.conftest import drain_queue, wait_until
from tests.model_packages import installed_package
from wire.topology import Topology

pytestmark = [pytest.mark.stack, pytest.mark.slow]

JOBS = 60
MAX_BATCH = 16

COUNTING_MODEL = '''
"""A user's model: says how many inputs shared its batch."""


class CountingModel:
    def prepare(self, raw_input, attempt):
        return raw_input["text"]

    def predict(self, inputs):
        return [{"text": text.upper(), "batch": len(inputs)} for text in inputs]
'''


def _catalogue(tmp_path: Path, package: str) -> Path:
    """A catalogue naming the installed package's model `counter`, with its sections."""
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(
        textwrap.dedent(
            f"""
            models:
              counter:
                class: {package}.counting:CountingModel
                description: Counts its batch.
                input_schema:
                  type: object
                  required: [text]
                  properties: {{text: {{type: string}}}}
                batching: {{max_size: {MAX_BATCH}, adaptive: false, max_wait_ms: 200}}
                scaling: {{max_replicas: 1, backlog_per_replica: 100, cooldown_s: 600, polling_interval_s: 1}}
            """
        )
    )
    return catalogue


async def _replicas(process: StackProcess) -> int:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{process.metrics_port}/metrics")).text
    match = re.search(r'^inferq_autoscaler_replicas\{model="counter"\} ([0-9.]+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else -1


async def test_a_users_model_package_is_validated_woken_from_zero_batched_and_called_back(
    amqp_url: str, topology: Topology, receiver: CallbackReceiver, webhook_secret: str, tmp_path: Path
) -> None:
    package = f"acme_counter_{uuid.uuid4().hex[:8]}"
    with installed_package(tmp_path, package, {"counting": COUNTING_MODEL}):
        await _serve_and_check(_catalogue(tmp_path, package), amqp_url, topology, receiver, webhook_secret)


async def _serve_and_check(
    catalogue: Path, amqp_url: str, topology: Topology, receiver: CallbackReceiver, webhook_secret: str
) -> None:
    process = StackProcess(
        {
            **os.environ,
            "AMQP_URL": amqp_url,
            "QUEUE_PREFIX": topology.prefix,
            "WEBHOOK_SECRET": webhook_secret,
            "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
            "MODEL_CATALOGUE": str(catalogue),
            "MODELS": "counter",
            "DRAIN_TIMEOUT_S": "5",
        }
    )
    try:
        await process.start()
        async with httpx.AsyncClient(base_url=process.base_url, timeout=30) as client:
            # Phase 0, at rest: the autoscaler knows the model, which has no replica.
            await wait_until(lambda: _is(_replicas(process), 0), 10, "counter known and at 0 replicas")

            # Phase 1, a bad input: 422 naming the field, nothing queued, nothing woken.
            refused = await client.post("/v1/models/counter/jobs", json={"input": {"text": 7}})
            assert refused.status_code == 422, refused.text
            assert refused.json()["errors"][0]["pointer"] == "/input/text"
            assert await drain_queue(amqp_url, topology.main_queue("counter")) == []

            # Phase 2, a burst: woken from 0, every job called back, signed, in batches.
            async def submit(n: int) -> str:
                response = await client.post(
                    "/v1/models/counter/jobs",
                    json={"input": {"text": f"job {n}"}, "callback_url": receiver.url},
                )
                assert response.status_code == 202, response.text
                return str(response.json()["id"])

            ids = set(await asyncio.gather(*(submit(n) for n in range(JOBS))))
            await wait_until(lambda: _at_least(_replicas(process), 1), 30, "a replica woken from zero")
            await wait_until(
                lambda: ids <= {r.event["data"]["id"] for r in receiver.received}, 120, "every callback"
            )
    finally:
        assert await process.stop() == 0, process.output()[-3000:]

    callbacks = [r for r in receiver.received if r.event["data"]["id"] in ids]
    outputs = [r.event["data"]["output"] for r in callbacks]
    assert len(callbacks) == JOBS and all(r.verified for r in callbacks)
    assert {r.event["type"] for r in callbacks} == {"job.succeeded"}
    assert sorted(o["text"] for o in outputs) == sorted(f"JOB {n}" for n in range(JOBS))
    assert max(o["batch"] for o in outputs) > 1, "the burst was batched"
    assert max(o["batch"] for o in outputs) <= MAX_BATCH, "batching.max_size holds"


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _at_least(value: Awaitable[int], expected: int) -> bool:
    return await value >= expected
