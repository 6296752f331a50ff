"""Fixtures: the real broker, a namespaced topology cleaned up after each test, the
ingress app with its lifespan, and a real callback receiver."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import httpx
import pytest
import redis.asyncio
from aiohttp import web

from autoscaler.queue_metrics import management_url_from_amqp, vhost_from_amqp
from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from callbacks.signing import generate_secret
from ingress.app import create_app
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from loadgen.stack_process import free_port
from local_stack.ha_cluster import NODES as HA_NODES
from local_stack.ha_cluster import HaNode, wait_until_running
from local_stack.ha_cluster import down as ha_down
from local_stack.ha_cluster import up as ha_up
from local_stack.local_services import make_bucket, start_moto_server, wait_until_answers
from manifests import upstream_crds
from object_store.store import ObjectStore, StoreSettings
from policies.callback_guard import AllowList
from ray_workers.job_worker import JobWorker
from ray_workers.models.base import Model
from ray_workers.settings import WorkerSettings
from settings.environment import DEFAULT_AMQP_URL
from tests.timeout_report import pytest_timeout_set_timer  # noqa: F401  (a hook: pytest finds it here)
from wire.envelope import CallbackDelivery, decode_callback_deliveries
from wire.retry_tiers import RetrySchedule
from wire.topology import QueueType, Topology

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TEST_MODELS = ("echo", "synthetic")
# Compressed schedules: the real ones wait minutes to hours.
TEST_JOB_RETRIES = RetrySchedule((0.4, 0.8), jitter=0.1)
TEST_CALLBACK_RETRIES = RetrySchedule((0.2, 0.2), jitter=0.1)


def _reachable(url: str, default_port: int = 5672) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """AMQP_URL (or the local default); a RabbitMQ testcontainer when neither answers."""
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if _reachable(url):
        yield url
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(5672)
            yield f"amqp://guest:guest@{host}:{port}/%2F"
            return
    except Exception as exc:
        message = (
            f"RabbitMQ is not reachable at AMQP_URL={url} and no testcontainer could start "
            f"({exc!r}); start one with `rabbitmq-server -detached` or set AMQP_URL"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """REDIS_URL (or the local default); a test fails, naming what to start, without one."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if not _reachable(url, 6379):
        pytest.fail(
            f"Redis is not reachable at REDIS_URL={url}; start one with `redis-server --daemonize yes`"
        )
    return url


@pytest.fixture
async def topology(amqp_url: str, redis_url: str) -> AsyncIterator[Topology]:
    """A topology under a fresh prefix; its queues and exchange are deleted afterwards."""
    async with fresh_topology(amqp_url, redis_url, "classic") as topo:
        yield topo


@asynccontextmanager
async def fresh_topology(amqp_url: str, redis_url: str, queue_type: QueueType) -> AsyncIterator[Topology]:
    """A topology of this queue type under a fresh prefix; its queues, exchanges and job
    records are deleted when the block ends (a module overrides `topology` with it)."""
    topo = Topology(
        prefix=f"t{uuid.uuid4().hex[:10]}.",
        job_retries=TEST_JOB_RETRIES,
        callback_retries=TEST_CALLBACK_RETRIES,
        queue_type=queue_type,
    )
    yield topo
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        models = ("echo", "embed-minilm", "synthetic")
        for spec in topo.queues(models):
            await channel.queue_delete(spec.name)
        await channel.queue_delete(topo.demand_queue)
        for exchange in topo.exchanges(models):
            await channel.exchange_delete(exchange.name)
        # What a test declared beyond these (a stack's default retry tiers, a user model's
        # queues) under the prefix: the broker is shared, nothing is left on it.
        queues, exchanges = await _named_under(amqp_url, topo.prefix)
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
    store = redis.asyncio.Redis.from_url(redis_url)
    async with store:
        keys = [key async for key in store.scan_iter(match=f"{topo.prefix}inferq:*")]
        if keys:
            await store.delete(*keys)


async def _named_under(amqp_url: str, prefix: str) -> tuple[list[str], list[str]]:
    """The queues and exchanges whose names start with `prefix`, from the management API."""
    management = urlsplit(management_url_from_amqp(amqp_url).split(",")[0])
    base = f"{management.scheme}://{management.hostname}:{management.port}"
    vhost = quote(vhost_from_amqp(amqp_url), safe="")
    auth = (management.username or "guest", management.password or "guest")
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=10) as api:
        names = []
        for kind in ("queues", "exchanges"):
            answer = await api.get(f"/api/{kind}/{vhost}", params={"columns": "name"})
            answer.raise_for_status()
            names.append([item["name"] for item in answer.json() if item["name"].startswith(prefix)])
    return names[0], names[1]


@pytest.fixture(scope="session")
def ha_cluster() -> Iterator[tuple[HaNode, ...]]:
    """The local three-node cluster (`task ha:up`), beside the broker on 5672, stopped and
    removed when the session ends."""
    if os.geteuid() != 0 or shutil.which("rabbitmq-server") is None:
        message = "the local HA cluster needs root and rabbitmq-server (apt-get install rabbitmq-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        ha_up()
        wait_until_running(HA_NODES)
        yield HA_NODES
    finally:
        ha_down()


@pytest.fixture(scope="session")
def object_store() -> Iterator[StoreSettings]:
    """A real S3-compatible server (moto's) on a free loopback port, its bucket made."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_moto_server("127.0.0.1", port)
    try:
        assert wait_until_answers(url, port, 60), "moto's server did not start"
        settings = StoreSettings(url, "inferq-test", access_key_id="test", secret_access_key="test")
        asyncio.run(make_bucket(settings))
        yield settings
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
async def store(object_store: StoreSettings) -> AsyncIterator[ObjectStore]:
    """A client of the test store, open for the test."""
    async with ObjectStore(object_store) as opened:
        yield opened


@pytest.fixture
def with_store(ingress_settings: IngressSettings, object_store: StoreSettings) -> IngressSettings:
    """The ingress's settings with the test store: uploads on."""
    return replace(ingress_settings, object_store=object_store)


@pytest.fixture
async def store_client(with_store: IngressSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_ingress(with_store) as http:
        yield http


@asynccontextmanager
async def serving(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """`app` served on `host` at a free port, which it yields; cleaned up after."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def wait_until_tried(client: httpx.AsyncClient, job_id: str, what: str) -> None:
    """Until the job's record counts its first attempt (bounded: 15 s)."""

    async def tried() -> bool:
        attempts: int = (await client.get(f"/v1/jobs/{job_id}")).json()["attempts"]
        return attempts >= 1

    await wait_until(tried, 15, what)


async def upload_json(client: httpx.AsyncClient, value: Any) -> dict[str, Any]:
    """An upload made through the ingress (POST /v1/uploads) and `value` PUT as JSON to its
    URL, straight to the store; the ingress's answer."""
    return await upload_bytes(client, json.dumps(value).encode())


async def upload_bytes(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    """An upload made through the ingress and `data` PUT to its URL; the ingress's answer."""
    answer = await client.post("/v1/uploads")
    assert answer.status_code == 201, answer.text
    upload: dict[str, Any] = answer.json()
    async with httpx.AsyncClient() as direct:  # to the store itself, not through the ingress
        put = await direct.put(upload["upload_url"], content=data)
    assert put.status_code == 200, put.text
    return upload


@pytest.fixture
def webhook_secret() -> str:
    return generate_secret()


@pytest.fixture
async def receiver(webhook_secret: str) -> AsyncIterator[CallbackReceiver]:
    server = CallbackReceiver(webhook_secret)
    await server.start()
    yield server
    await server.stop()


def ingress_settings_for(amqp_url: str, topology: Topology, redis_url: str) -> IngressSettings:
    """The test ingress's settings: the test models, callbacks to loopback allowed."""
    return IngressSettings(
        amqp_url=amqp_url,
        models=TEST_MODELS,
        topology=topology,
        callback_allow=AllowList.parse(["127.0.0.1"]),
        redis_url=redis_url,
    )


def worker_settings_for(amqp_url: str, topology: Topology, redis_url: str) -> WorkerSettings:
    return WorkerSettings(
        amqp_url=amqp_url, models=TEST_MODELS, topology=topology, drain_timeout_s=5.0, redis_url=redis_url
    )


def callback_settings_for(
    amqp_url: str, topology: Topology, redis_url: str, webhook_secret: str
) -> CallbackSettings:
    return CallbackSettings(
        redis_url=redis_url,
        amqp_url=amqp_url,
        webhook_secret=webhook_secret,
        models=TEST_MODELS,
        topology=topology,
        callback_allow=AllowList.parse(["127.0.0.1"]),
        callback_timeout_s=2.0,
        drain_timeout_s=5.0,
    )


@pytest.fixture
def ingress_settings(amqp_url: str, topology: Topology, redis_url: str) -> IngressSettings:
    return ingress_settings_for(amqp_url, topology, redis_url)


@pytest.fixture
def worker_settings(amqp_url: str, topology: Topology, redis_url: str) -> WorkerSettings:
    return worker_settings_for(amqp_url, topology, redis_url)


@pytest.fixture
def callback_settings(
    amqp_url: str, topology: Topology, webhook_secret: str, redis_url: str
) -> CallbackSettings:
    return callback_settings_for(amqp_url, topology, redis_url, webhook_secret)


@pytest.fixture
async def client(ingress_settings: IngressSettings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_ingress(ingress_settings) as http:
        yield http


@pytest.fixture
async def dispatcher(callback_settings: CallbackSettings) -> AsyncIterator[CallbackDispatcher]:
    stage = CallbackDispatcher(callback_settings)
    await stage.start()
    yield stage
    await stage.stop()


@pytest.fixture
async def broker(worker_settings: WorkerSettings) -> AsyncIterator[Broker]:
    probe = Broker(worker_settings.amqp_url, worker_settings.topology, worker_settings.models)
    await probe.connect()
    yield probe
    await probe.close()


@asynccontextmanager
async def running_worker(model: Model, settings: WorkerSettings) -> AsyncIterator[JobWorker]:
    """A started JobWorker, stopped (drained) when the block ends, however it ends."""
    worker = JobWorker(model, settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


@asynccontextmanager
async def running_ingress(
    settings: IngressSettings, wait_ready: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The ingress app with its lifespan running, and a client speaking to it over ASGI."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            if wait_ready:
                await wait_until(lambda: app.state.ingress.broker.is_ready, 10, "broker ready")
            yield client


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def queue_holds(amqp_url: str, queue_name: str, count: int) -> bool:
    """Whether exactly `count` messages wait in the queue (a passive declare)."""
    async with await aio_pika.connect(amqp_url) as connection:
        queue = await (await connection.channel()).declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count == count


async def jobs_held(amqp_url: str, topology: Topology, model: str) -> int:
    """Jobs waiting in every queue of the model's (each lane, each priority, each chunk
    queue: a chunk counts as its jobs)."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        total = 0
        for name, jobs in topology.counted_queues(model):
            queue = await channel.declare_queue(name, passive=True)
            total += (queue.declaration_result.message_count or 0) * jobs
        return total


async def report_chaos(report: str) -> None:
    """Print a chaos run's figures, and append them to CHAOS_REPORT when it is set."""
    print("\n" + report)
    if path := os.environ.get("CHAOS_REPORT"):
        await asyncio.to_thread(_append_line, Path(path), report)


def _append_line(path: Path, line: str) -> None:
    with path.open("a") as out:
        out.write(line + "\n")


def callbacks_in(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[CallbackDelivery]:
    """The callback events these callbacks-queue messages carry (a worker's batch sends its
    events for one host as one message)."""
    return [callback for m in messages for callback in decode_callback_deliveries(m.body, m.type)]


async def drain_queue(amqp_url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now ready in `queue`, acked (taken out) in order."""
    messages = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=True)
        while (message := await source.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
    return messages


def require_upstream_crds(
    env: Mapping[str, str] = os.environ,
    shared: Path = upstream_crds.SHARED_SCHEMAS,
    fetch: Callable[[], Sequence[str]] = upstream_crds.fetch_missing_once,
) -> None:
    """Go on once every pinned upstream CRD is found (fetched into the cache if need be);
    otherwise skip, saying why, or under CI (which points KEDA_CRD_DIR and RABBITMQ_CRD_DIR
    at ../shared/schemas) fail: the same verdict for every CRD-dependent test."""
    if not upstream_crds.missing(env, shared):
        return
    problems = list(fetch())
    still = upstream_crds.missing(env, shared)
    if not still:
        return
    message = (
        f"upstream CRDs not found: {[crd.filename for crd in still]} ({'; '.join(problems)}); "
        "run `task crds` where there is a network, or set KEDA_CRD_DIR / RABBITMQ_CRD_DIR"
    )
    if env.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
