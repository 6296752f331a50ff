"""Chaos: the broker restarts while jobs are being submitted and processed.

Every job that got a 202 must reach a terminal state and be called back; no job gets
a 202 without a broker confirm (those that were refused got 503 + Retry-After).
Needs control of the local broker (rabbitmqctl), so it runs where the broker is local.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.job_worker import JobWorker
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings
from tests.conftest import running_ingress, wait_until

JOBS = 400
SUBMIT_INTERVAL_S = 0.02  # open loop: ~50 submissions/s whatever the answers take
RESTART_AFTER_JOBS = 100


def _local_broker_control(amqp_url: str) -> str:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if urlsplit(amqp_url).hostname not in ("127.0.0.1", "localhost") or rabbitmqctl is None:
        pytest.skip("broker restart needs a local RabbitMQ and rabbitmqctl")
    return rabbitmqctl


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as out:
        out.write(line + "\n")


async def _restart_broker(rabbitmqctl: str) -> None:
    for action in ("stop_app", "start_app"):
        process = await asyncio.create_subprocess_exec(
            rabbitmqctl, action, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        assert await asyncio.wait_for(process.wait(), 60) == 0, f"rabbitmqctl {action} failed"


async def test_given_a_broker_restart_under_load_then_no_accepted_job_is_lost(
    amqp_url: str,
    ingress_settings: IngressSettings,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    receiver: CallbackReceiver,
) -> None:
    rabbitmqctl = _local_broker_control(amqp_url)
    statuses: Counter[int] = Counter()
    accepted: set[str] = set()
    worker = JobWorker(EchoModel(), worker_settings)
    dispatcher = CallbackDispatcher(callback_settings)
    await worker.start()
    await dispatcher.start()
    try:
        async with running_ingress(ingress_settings) as client:

            async def submit(n: int) -> None:
                try:
                    response = await client.post(
                        "/v1/models/echo/jobs", json={"input": n, "callback_url": receiver.url}
                    )
                except httpx.HTTPError:
                    statuses[0] += 1
                    return
                statuses[response.status_code] += 1
                if response.status_code == 202:
                    accepted.add(response.json()["id"])
                else:
                    assert response.status_code == 503 and response.headers["retry-after"].isdigit()

            submissions = []
            restart = None
            for n in range(JOBS):
                submissions.append(asyncio.create_task(submit(n)))
                if n == RESTART_AFTER_JOBS:
                    restart = asyncio.create_task(_restart_broker(rabbitmqctl))
                await asyncio.sleep(SUBMIT_INTERVAL_S)  # the arrival schedule, not a wait for a result
            await asyncio.gather(*submissions)
            assert restart is not None
            await restart
            # The restart overlapped the load: some submissions were refused while it was away.
            assert statuses[202] > 0 and statuses[503] > 0, dict(statuses)

            # Once the broker is back, the ingress is ready and takes jobs again, no restart.
            async def ready_again() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await wait_until(ready_again, 30, "the ingress to be ready again")
            after = await client.post(
                "/v1/models/echo/jobs", json={"input": "after", "callback_url": receiver.url}
            )
            assert after.status_code == 202, after.text
            accepted.add(after.json()["id"])

            def all_called_back() -> bool:
                return accepted <= {r.event["data"]["id"] for r in receiver.received}

            started = time.monotonic()
            await wait_until(all_called_back, 120, "a callback for every accepted job")
            drained_s = time.monotonic() - started
    finally:
        await worker.stop()
        await dispatcher.stop()

    ids = [r.event["data"]["id"] for r in receiver.received]
    duplicates = len(ids) - len(set(ids))
    unknown = set(ids) - accepted  # published, but the confirm was lost with the connection
    report = (
        f"chaos: submitted {JOBS} + 1 after, accepted {len(accepted)}, refused {JOBS + 1 - len(accepted)} "
        f"({dict(statuses)}), terminal {len(accepted & set(ids))}, lost 0, duplicated callbacks "
        f"{duplicates}, called back without a 202 {len(unknown)}, drained {drained_s:.1f} s after load"
    )
    print("\n" + report)
    if path := os.environ.get("CHAOS_REPORT"):
        await asyncio.to_thread(_append_line, Path(path), report)
    assert all(r.verified for r in receiver.received)
    assert statuses[202] + statuses[503] + statuses[0] == JOBS
    assert len(accepted) == statuses[202] + 1  # the submissions, and one after the restart
