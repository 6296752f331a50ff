"""Inputs by URL, end to end on the real broker: a job names `input_url`, the worker
fetches it through the callback-URL guard and runs on it. The guard refuses addresses off
the allow-list at submit and again in the worker, before any packet leaves: the servers
on 127.0.0.2 here (loopback, left off the allow-list) must never be asked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from aiohttp import web

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from policies.callback_guard import AllowList
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings
from tests.conftest import queue_holds, running_ingress, running_worker

SERVED = {"from": "a URL", "rows": list(range(1000))}


@dataclass
class InputServer:
    """An HTTP server for inputs on `host`, counting the requests it was sent."""

    host: str
    requests: list[str] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    async def start(self) -> None:
        async def serve(request: web.Request) -> web.StreamResponse:
            self.requests.append(request.path)
            if request.path == "/input.json":
                return web.json_response(SERVED)
            if request.path == "/big.json":
                return web.Response(body=b'"' + b"x" * 4096 + b'"', content_type="application/json")
            if request.path == "/moved":
                raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
            return web.Response(status=404)

        app = web.Application()
        app.router.add_get("/{tail:.*}", serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def allowed_server() -> AsyncIterator[InputServer]:
    server = InputServer("127.0.0.1")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def refused_server() -> AsyncIterator[InputServer]:
    server = InputServer("127.0.0.2")
    await server.start()
    yield server
    await server.stop()


async def _callback_of(
    client: httpx.AsyncClient, receiver: CallbackReceiver, body: dict[str, Any]
) -> dict[str, Any]:
    answer = await client.post("/v1/models/echo/jobs", json={**body, "callback_url": receiver.url})
    assert answer.status_code == 202, answer.text
    (received,) = await receiver.wait_for(1, timeout_s=30)
    assert received.verified
    event: dict[str, Any] = received.event
    return event


async def test_given_an_input_url_then_the_worker_fetches_it_and_the_job_runs_on_it(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    allowed_server: InputServer,
) -> None:
    settings = replace(worker_settings, input_allow=AllowList.parse(["127.0.0.1"]))
    async with running_worker(EchoModel(), settings):
        event = await _callback_of(client, receiver, {"input_url": allowed_server.url("/input.json")})

    assert event["type"] == "job.succeeded" and event["data"]["output"] == SERVED
    assert allowed_server.requests == ["/input.json"]


@pytest.mark.parametrize(
    ("path", "max_bytes", "error"),
    [
        ("/missing.json", 1024**3, "answered 404"),
        ("/moved", 1024**3, "answered 302 (redirects are not followed)"),
        ("/big.json", 1024, "over UPLOAD_MAX_BYTES (1024)"),
    ],
)
async def test_given_an_input_url_that_cannot_be_used_then_the_job_fails_once_saying_why(
    client: httpx.AsyncClient,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    allowed_server: InputServer,
    path: str,
    max_bytes: int,
    error: str,
) -> None:
    allowed = AllowList.parse(["127.0.0.1"])
    settings = replace(worker_settings, input_allow=allowed, upload_max_bytes=max_bytes)
    async with running_worker(EchoModel(), settings):
        event = await _callback_of(client, receiver, {"input_url": allowed_server.url(path)})

    assert event["type"] == "job.failed" and error in event["data"]["error"]
    assert event["data"]["attempts"] == 1, "permanent: no retry"
    assert allowed_server.requests == [path], "the redirect's target is never asked"


async def test_given_an_input_url_off_the_allow_list_then_submit_refuses_it_and_nothing_is_sent(
    client: httpx.AsyncClient, broker: Broker, amqp_url: str, refused_server: InputServer
) -> None:
    answer = await client.post("/v1/models/echo/jobs", json={"input_url": refused_server.url("/input.json")})

    assert answer.status_code == 422 and answer.json()["type"].endswith("invalid-input-url")
    assert "input_url host '127.0.0.2' resolves to 127.0.0.2, which is loopback" in answer.json()["detail"]
    assert refused_server.requests == []
    assert await queue_holds(amqp_url, broker.topology.job_queues("echo")[0], 0)


async def test_given_a_worker_whose_guard_refuses_the_url_then_the_job_fails_and_nothing_is_sent(
    ingress_settings: IngressSettings,
    receiver: CallbackReceiver,
    worker_settings: WorkerSettings,
    dispatcher: CallbackDispatcher,
    refused_server: InputServer,
) -> None:
    """The worker checks again (DNS may answer otherwise by then): an ingress that let the
    URL through does not make the worker fetch it."""
    lax = replace(ingress_settings, callback_allow=AllowList.parse(["127.0.0.1", "127.0.0.2"]))
    async with running_ingress(lax) as client, running_worker(EchoModel(), worker_settings):
        event = await _callback_of(client, receiver, {"input_url": refused_server.url("/input.json")})

    assert event["type"] == "job.failed" and "refused: input_url host '127.0.0.2'" in event["data"]["error"]
    assert refused_server.requests == []


@pytest.mark.parametrize(
    "body",
    [
        {"input": 1, "input_url": "http://127.0.0.1:9/x"},
        {"input_ref": "uploads/anonymous/" + "0" * 32, "input_url": "http://127.0.0.1:9/x"},
        {"input_url": "file:///etc/passwd"},
    ],
)
async def test_given_two_inputs_or_an_unusable_url_then_the_job_is_refused(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    answer = await client.post("/v1/models/echo/jobs", json=body)

    assert answer.status_code == 422, answer.text
    assert answer.json()["type"].endswith(("validation-error", "invalid-input-url", "uploads-off"))
    assert "input" in answer.json()["detail"]
