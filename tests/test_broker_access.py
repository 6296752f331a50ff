"""Per-component broker users with least privilege, on the real broker.

`apply` grants each role its access in a fresh virtual host and declares the topology;
then the pipeline runs end to end with every component on its own user and
DECLARE_TOPOLOGY=false (a job retried, one parked, a callback retried), and each role
is refused what is not its own: other models' queues, the default exchange, other
roles' exchanges, declaring.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import httpx
import pytest

from autoscaler.queue_metrics import management_url_from_amqp
from broker.client import Broker, TopologyMissing
from broker_access.__main__ import main
from broker_access.access_setup import apply, read_passwords
from broker_access.management import AccessSetupFailed
from broker_access.roles import roles
from callbacks.dispatcher import CallbackDispatcher
from loadgen.callback_receiver import CallbackReceiver
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tests.conftest import (
    TEST_CALLBACK_RETRIES,
    TEST_JOB_RETRIES,
    TEST_MODELS,
    callback_settings_for,
    ingress_settings_for,
    queue_holds,
    running_ingress,
    running_worker,
    wait_until,
    worker_settings_for,
)
from wire.topology import Topology

TOPOLOGY = Topology(prefix="p.", job_retries=TEST_JOB_RETRIES, callback_retries=TEST_CALLBACK_RETRIES)


@dataclasses.dataclass(frozen=True)
class Access:
    """A virtual host set up by `apply`: each role's AMQP URL, the admin's, the topology."""

    urls: dict[str, str]
    admin_url: str
    management_url: str
    vhost: str
    topology: Topology


def _in_vhost(amqp_url: str, vhost: str, user: str | None = None, password: str | None = None) -> str:
    parts = urlsplit(amqp_url)
    netloc = parts.netloc if user is None else f"{user}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))


@pytest.fixture
async def access(amqp_url: str, tmp_path: Path) -> AsyncIterator[Access]:
    vhost = f"inferq-test-{uuid.uuid4().hex[:8]}"
    topology = dataclasses.replace(TOPOLOGY, prefix=f"{vhost}.", declared_by_clients=False)
    passwords = {role.name: secrets.token_urlsafe(24) for role in roles(topology, TEST_MODELS)}
    for name, password in passwords.items():
        (tmp_path / name).write_text(password + "\n")
    admin_url = _in_vhost(amqp_url, vhost)
    management_url = management_url_from_amqp(amqp_url)
    users = await apply(admin_url, management_url, topology, TEST_MODELS, tmp_path)
    urls = {
        role.name: _in_vhost(amqp_url, vhost, role.user(topology), passwords[role.name])
        for role in roles(topology, TEST_MODELS)
    }
    try:
        yield Access(urls, admin_url, management_url, vhost, topology)
    finally:
        parts = urlsplit(management_url)
        auth = (parts.username or "guest", parts.password or "guest")
        base = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        async with httpx.AsyncClient(base_url=base, auth=auth) as api:
            await api.delete(f"/api/vhosts/{quote(vhost, safe='')}")  # its queues and exchanges too
            for user in users:
                await api.delete(f"/api/users/{quote(user, safe='')}")


def test_each_role_s_patterns_match_its_own_resources_and_no_others() -> None:
    by_name = {role.name: role for role in roles(TOPOLOGY, ("echo", "embed-minilm"))}

    def matches(pattern: str, name: str) -> bool:
        return re.search(pattern, name) is not None

    worker = by_name["worker-echo"]
    assert matches(worker.read, "p.jobs.echo")
    assert not matches(worker.read, "p.jobs.embed-minilm")
    assert not matches(worker.read, "p.jobs.echo.parked")
    assert not matches(worker.read, "pXjobs.echo")  # the prefix's dot is literal
    assert matches(worker.write, "p.job-outcomes.echo")
    assert not matches(worker.write, "p.job-outcomes.embed-minilm")
    assert not matches(worker.write, "amq.default") and not matches(worker.write, "")
    ingress = by_name["ingress"]
    assert [matches(ingress.write, n) for n in ("p.jobs", "p.events", "p.callback-outcomes")] == [
        True,
        True,
        False,
    ]
    assert ingress.read == ingress.configure == "^$"
    callbacks = by_name["callbacks"]
    assert matches(callbacks.read, "p.callbacks") and not matches(callbacks.read, "p.callbacks.parked")
    assert by_name["monitor"].tags == ("management",)
    assert {r.configure for r in by_name.values() if r.name != "push-scaler"} == {"^$"}


async def test_given_own_users_and_no_declaring_then_jobs_retries_parking_and_callback_retries_all_flow(
    access: Access, amqp_url: str, redis_url: str, receiver: CallbackReceiver, webhook_secret: str
) -> None:
    topology, urls = access.topology, access.urls
    ingress = ingress_settings_for(urls["ingress"], topology, redis_url)
    callbacks = callback_settings_for(urls["callbacks"], topology, redis_url, webhook_secret)

    def worker(model: str) -> WorkerSettings:
        return worker_settings_for(urls[f"worker-{model}"], topology, redis_url)

    receiver.scripted_statuses.append(503)  # the first callback is retried through a delay tier
    dispatcher = CallbackDispatcher(callbacks)
    await dispatcher.start()
    try:
        async with (
            running_ingress(ingress) as client,
            running_worker(EchoModel(), worker("echo")),
            running_worker(SyntheticModel(), worker("synthetic")),
        ):
            jobs = [
                ("echo", {"hello": 1}),
                ("synthetic", {"fail_until_attempt": 2}),
                ("synthetic", {"fail_permanently": True}),
            ]
            for model, job_input in jobs:
                body = {"input": job_input, "callback_url": receiver.url}
                response = await client.post(f"/v1/models/{model}/jobs", json=body)
                assert response.status_code == 202, response.text

            received = await receiver.wait_for(3, timeout_s=20)
    finally:
        await dispatcher.stop()

    assert sorted(r.event["type"] for r in received) == ["job.failed", "job.succeeded", "job.succeeded"]
    assert all(r.verified for r in received)
    assert sorted(r.event["data"]["attempts"] for r in received if r.event["type"] == "job.succeeded") == [
        1,
        2,
    ]
    # The 503 was answered to one of the three: it came back from a delay tier to arrive.
    assert not receiver.scripted_statuses and len({r.webhook_id for r in received}) == 3
    parked = topology.parking_queue("synthetic")
    await wait_until(lambda: queue_holds(access.admin_url, parked, 1), 10, "the parked job")


async def test_given_the_ingress_on_its_own_user_when_a_job_is_canceled_then_job_canceled_is_queued_at_once(
    access: Access, redis_url: str
) -> None:
    """Review item 1: the cancel's `job.canceled` went through the default exchange, which the
    ingress's user may not write to: ACCESS_REFUSED closed its publish channel and the event
    was left to a worker. Nothing runs the job here, so only the ingress can have sent it."""
    topology = access.topology
    async with running_ingress(ingress_settings_for(access.urls["ingress"], topology, redis_url)) as client:
        body = {"input": 1, "callback_url": "http://127.0.0.1:9/"}
        submitted = await client.post("/v1/models/echo/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        canceled = await client.post(f"/v1/jobs/{submitted.json()['id']}/cancel")
        assert canceled.status_code == 200, canceled.text
        after = await client.post("/v1/models/echo/jobs", json=body)
        assert after.status_code == 202, after.text

    await wait_until(lambda: queue_holds(access.admin_url, topology.callbacks_queue, 1), 10, "job.canceled")


RefusedAction = Callable[[aio_pika.abc.AbstractChannel, Topology], Awaitable[object]]


async def _consume(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> object:
    queue = await channel.declare_queue(queue_name, passive=True)
    return await queue.consume(_ignore)


async def _publish(channel: aio_pika.abc.AbstractChannel, exchange_name: str, key: str) -> object:
    exchange = channel.default_exchange if exchange_name == "" else await channel.get_exchange(exchange_name)
    return await exchange.publish(aio_pika.Message(b"{}"), key)


REFUSALS: list[tuple[str, str, RefusedAction]] = [
    ("ingress", "consume its jobs", lambda c, t: _consume(c, t.main_queue("echo"))),
    ("worker-echo", "consume another model's jobs", lambda c, t: _consume(c, t.main_queue("synthetic"))),
    ("worker-echo", "publish a job", lambda c, t: _publish(c, t.jobs_exchange, "echo")),
    (
        "worker-echo",
        "publish through the default exchange",
        lambda c, t: _publish(c, "", t.main_queue("echo")),
    ),
    (
        "worker-echo",
        "publish another model's outcomes",
        lambda c, t: _publish(c, t.job_outcomes_exchange("synthetic"), t.parking_queue("synthetic")),
    ),
    (
        "worker-echo",
        "declare its own queue",
        lambda c, t: c.declare_queue(t.main_queue("echo"), durable=True, arguments={"x-max-priority": 10}),
    ),
    (
        "callbacks",
        "publish a worker's outcomes",
        lambda c, t: _publish(c, t.job_outcomes_exchange("echo"), t.callbacks_queue),
    ),
    ("callbacks", "consume jobs", lambda c, t: _consume(c, t.main_queue("echo"))),
    ("monitor", "consume callbacks", lambda c, t: _consume(c, t.callbacks_queue)),
    ("push-scaler", "consume callbacks", lambda c, t: _consume(c, t.callbacks_queue)),
]


@pytest.mark.parametrize(("role", "action", "attempt"), REFUSALS, ids=[f"{r}: {a}" for r, a, _ in REFUSALS])
async def test_a_role_is_refused_what_is_not_its_own(
    access: Access, role: str, action: str, attempt: RefusedAction
) -> None:
    async with await aio_pika.connect(access.urls[role]) as connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await attempt(channel, access.topology)


async def test_the_monitor_reads_queue_figures_from_the_management_api_and_the_push_scaler_subscribes(
    access: Access,
) -> None:
    monitor = urlsplit(access.urls["monitor"])
    management = urlsplit(access.management_url)
    base = f"{management.scheme}://{management.hostname}:{management.port}"
    queue = quote(access.topology.callbacks_queue, safe="")
    async with httpx.AsyncClient(base_url=base, auth=(monitor.username or "", monitor.password or "")) as api:
        answer = await api.get(f"/api/queues/{quote(access.vhost, safe='')}/{queue}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == access.topology.callbacks_queue

    scaler = Broker(access.urls["push-scaler"], access.topology, TEST_MODELS, role="push-scaler")
    await scaler.connect()
    try:
        # Its own queue, as each of the cluster's push scaler pods names it.
        await scaler.subscribe(
            access.topology.push_scaler_instance_queue("push-scaler-0"), "model.*.demand", _ignore
        )
    finally:
        await scaler.close()


async def _ignore(_message: object) -> None:
    """A consumer that never sees a message: the refusal comes first."""


async def test_given_no_declaring_and_no_topology_then_the_start_names_what_is_missing(amqp_url: str) -> None:
    missing = dataclasses.replace(TOPOLOGY, prefix=f"t{uuid.uuid4().hex[:10]}.", declared_by_clients=False)
    broker = Broker(amqp_url, missing, TEST_MODELS)

    with pytest.raises(TopologyMissing, match=rf"exchange {re.escape(missing.jobs_exchange)} does not exist"):
        await broker.connect()
    assert not broker.is_ready


def test_a_missing_or_short_password_is_refused_before_anything_is_granted(tmp_path: Path) -> None:
    wanted = roles(TOPOLOGY, ("echo",))
    with pytest.raises(AccessSetupFailed, match="no password for role ingress"):
        read_passwords(tmp_path, wanted)
    for role in wanted:
        (tmp_path / role.name).write_text("short")
    with pytest.raises(AccessSetupFailed, match="shorter than 16"):
        read_passwords(tmp_path, wanted)


def test_the_roles_command_lists_each_role_and_its_user_for_cluster_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELS", "echo,embed-minilm")
    monkeypatch.delenv("QUEUE_PREFIX", raising=False)

    assert main(["roles"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "ingress inferq-ingress",
        "worker-echo inferq-worker-echo",
        "worker-embed-minilm inferq-worker-embed-minilm",
        "callbacks inferq-callbacks",
        "push-scaler inferq-push-scaler",
        "monitor inferq-monitor",
    ]


def test_apply_without_passwords_says_what_it_needs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply"]) == 2
    assert "apply needs --passwords-dir" in capsys.readouterr().err
