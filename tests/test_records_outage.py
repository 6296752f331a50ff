"""Redis stopped and restarted mid-run: nothing accepted is lost, callbacks keep flowing,
keyed submissions answer 503 meanwhile, and every record ends correct.

Runs its own `redis-server` (append-only file in a temporary directory, a free port), so
the shared Redis is never stopped."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.settings import WorkerSettings
from tests.conftest import running_ingress, running_worker, wait_until
from tests.models import RecordingModel

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of this test's own, stopped and started at will, data kept on disk."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self._directory),
        ]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self._process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self._process.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on {self.port} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)
        self._process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


async def _submit(
    client: httpx.AsyncClient, n: int, callback_url: str | None, **headers: str
) -> httpx.Response:
    body: dict[str, Any] = (
        {"input": n} if callback_url is None else {"input": n, "callback_url": callback_url}
    )
    return await client.post("/v1/models/echo/jobs", json=body, headers=headers)


async def _accepted_ids(
    client: httpx.AsyncClient, start: int, count: int, receiver_url: str
) -> dict[str, bool]:
    """`count` jobs, every other one without a callback (poll only), all accepted: whether
    each has a callback, by job id."""
    ids = {}
    for n in range(start, start + count):
        response = await _submit(client, n, receiver_url if n % 2 else None)
        assert response.status_code == 202, response.text
        ids[response.json()["id"]] = bool(n % 2)
    return ids


async def test_given_redis_stopped_and_restarted_mid_run_then_nothing_is_lost_and_records_catch_up(
    private_redis: PrivateRedis,
    ingress_settings: IngressSettings,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    receiver: CallbackReceiver,
) -> None:
    url = private_redis.url
    dispatcher = CallbackDispatcher(dataclasses.replace(callback_settings, redis_url=url))
    await dispatcher.start()
    try:
        async with (
            running_ingress(dataclasses.replace(ingress_settings, redis_url=url)) as client,
            running_worker(RecordingModel(), dataclasses.replace(worker_settings, redis_url=url)),
        ):
            before = await _accepted_ids(client, 0, 20, receiver.url)
            await receiver.wait_for(10, timeout_s=15)

            private_redis.stop()
            during = await _accepted_ids(client, 100, 20, receiver.url)
            keyed = await _submit(client, 999, receiver.url, **{"Idempotency-Key": "while-down"})
            status_while_down = await client.get(f"/v1/jobs/{next(iter(during))}")
            # Callbacks are not held up by the outage.
            await receiver.wait_for(20, timeout_s=15)

            private_redis.start()
            every = before | during

            async def all_succeeded() -> bool:
                for job_id in every:
                    response = await client.get(f"/v1/jobs/{job_id}")
                    if response.status_code != 200 or response.json()["status"] != "succeeded":
                        return False
                return True

            await wait_until(all_succeeded, 30, "every record to read succeeded after Redis returned")
            outputs = {job_id: (await client.get(f"/v1/jobs/{job_id}")).json()["output"] for job_id in every}
            keyed_after = await _submit(client, 999, receiver.url, **{"Idempotency-Key": "after"})
    finally:
        await dispatcher.stop()

    assert keyed.status_code == 503 and "retry-after" in keyed.headers
    assert status_while_down.status_code == 503 and "retry-after" in status_while_down.headers
    assert keyed_after.status_code == 202
    received = [c for c in receiver.received if c.event["data"]["id"] in every]
    called_back = {c.event["data"]["id"] for c in received}
    assert called_back == {job_id for job_id, has_callback in every.items() if has_callback}
    assert len(received) == len(called_back)  # one callback each, none lost
    assert sorted(outputs.values()) == list(range(20)) + list(range(100, 120))
