"""Chaos: the broker restarts while jobs are being submitted and processed.

Every job that got a 202 must reach a terminal state and be called back; no job gets
a 202 without a broker confirm (those that were refused got 503 + Retry-After).
The restart runs on a node of the local three-node cluster (`task ha:up`); the memory
alarms on the local broker (rabbitmqctl), so they run where the broker is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import pytest

from broker.client import Broker, BrokerUnavailable
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from ingress.settings import IngressSettings
from loadgen.callback_receiver import CallbackReceiver
from local_stack.ha_cluster import HaNode, rabbitmqctl
from policies.callback_guard import AllowList, IPAddress
from ray_workers.job_worker import JobWorker
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings
from tests.conftest import drain_queue, report_chaos, running_ingress, wait_until
from wire.callback_events import callback_for
from wire.envelope import Job, JobTimings, decode_callback_deliveries, decode_job
from wire.job_message import job_message

pytestmark = pytest.mark.slow

JOBS = 400
SUBMIT_INTERVAL_S = 0.02  # open loop: ~50 submissions/s whatever the answers take
RESTART_AFTER_JOBS = 100


def _local_broker_control(amqp_url: str) -> str:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if urlsplit(amqp_url).hostname not in ("127.0.0.1", "localhost") or rabbitmqctl is None:
        pytest.skip("broker restart needs a local RabbitMQ and rabbitmqctl")
    return rabbitmqctl


async def _restart_broker(node: HaNode) -> None:
    for action in ("stop_app", "start_app"):
        await asyncio.to_thread(rabbitmqctl, node, action)


async def test_given_a_broker_restart_under_load_then_no_accepted_job_is_lost(
    ha_cluster: tuple[HaNode, ...],
    ingress_settings: IngressSettings,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    receiver: CallbackReceiver,
) -> None:
    """The classic topology on one broker that restarts: one node of the local cluster,
    the only one the clients know, holding every queue (the shared broker on 5672 is
    never stopped)."""
    node = ha_cluster[0]
    ingress_settings = replace(ingress_settings, amqp_url=node.amqp_url)
    worker_settings = replace(worker_settings, amqp_url=node.amqp_url)
    callback_settings = replace(callback_settings, amqp_url=node.amqp_url)
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
                    restart = asyncio.create_task(_restart_broker(node))
                await asyncio.sleep(SUBMIT_INTERVAL_S)  # the arrival schedule, not a wait for a result
            alive_throughout = True
            while not all(task.done() for task in submissions):
                alive_throughout &= worker.is_alive  # liveness never follows the broker
                await asyncio.sleep(0.05)
            await asyncio.gather(*submissions)
            assert restart is not None
            await restart
            assert alive_throughout, "the worker's liveness failed during a broker restart"
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
    await report_chaos(report)
    assert all(r.verified for r in receiver.received)
    assert statuses[202] + statuses[503] + statuses[0] == JOBS
    assert len(accepted) == statuses[202] + 1  # the submissions, and one after the restart


async def _rabbitmqctl(rabbitmqctl: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        rabbitmqctl, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, f"rabbitmqctl {args} failed"
    return out.decode().strip()


async def test_given_a_memory_alarm_then_submissions_are_refused_unwritten_and_none_runs_later(
    amqp_url: str, ingress_settings: IngressSettings
) -> None:
    """Hardening item 4: while the broker blocks publishers, the ingress answers 503 at once
    without writing the job; after the alarm clears, no refused job appears in the queue
    except the publishes that were on the wire when the broker blocked the connection (it
    blocks a connection at its next publish: here the first one, answered 503 after
    PUBLISH_TIMEOUT). The broker's watermark is restored whatever happens."""
    rabbitmqctl = _local_broker_control(amqp_url)
    original = await _rabbitmqctl(rabbitmqctl, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    settings = replace(ingress_settings, publish_timeout_s=2.0)
    queue = settings.topology.main_queue("echo")
    job = {"input": 1, "callback_url": "http://127.0.0.1:9/"}
    answers: list[tuple[int, float]] = []
    async with running_ingress(settings) as client:
        before = await client.post("/v1/models/echo/jobs", json=job)
        assert before.status_code == 202
        try:
            await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", "0.000001")
            for _ in range(6):
                started = time.monotonic()
                response = await client.post("/v1/models/echo/jobs", json=job)
                answers.append((response.status_code, time.monotonic() - started))
        finally:
            await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", original)
        after = await client.post("/v1/models/echo/jobs", json=job)
        assert after.status_code == 202, after.text

    assert [status for status, _ in answers] == [503] * 6
    quick = [elapsed_s for _, elapsed_s in answers[1:]]
    assert max(quick) < 1.0, f"refusals after the first waited {quick}: they were written"
    queued = await drain_queue(amqp_url, queue)
    ids = {decode_job(m.body).id for m in queued}
    assert {before.json()["id"], after.json()["id"]} <= ids
    assert len(ids) <= 3, "only the publish on the wire when the broker blocked may still arrive"


async def test_given_a_memory_alarm_then_the_dispatcher_waits_instead_of_sending_a_callback_each_lap(
    amqp_url: str, callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    """Budgets issue, review item 5: under an alarm the dispatcher sent a callback, could not
    publish its retry, requeued it and sent it again, lap after lap (parking it after 20).
    Now it waits until the broker reads publishes again, as the worker does. The receiver
    answers 503, so every attempt needs a publish. The watermark is restored whatever happens."""
    rabbitmqctl = _local_broker_control(amqp_url)
    original = await _rabbitmqctl(rabbitmqctl, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    receiver.scripted_statuses.extend([503] * 1000)
    job = Job(id="alarm-1", model="echo", input=1, callback_url=receiver.url, submitted_at_ms=0)
    timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
    event = callback_for(job, "succeeded", 1, timings, time.time(), callback_settings.topology)
    await broker.publish(event.message, event.routing_key, exchange=event.exchange)
    dispatcher = CallbackDispatcher(callback_settings)
    try:
        await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", "0.000001")
        await dispatcher.start()
        await wait_until(lambda: receiver.requests_seen >= 1, 10, "the first attempt")
        # A wait expected to run out: the first attempt's retry publish is blocked until its
        # timeout (10 s); after that a spinning dispatcher sends again at once.
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: receiver.requests_seen > 2, 14, "attempts during the alarm")
        attempts_during_alarm = receiver.requests_seen
    finally:
        await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", original)
    try:
        await wait_until(
            lambda: receiver.requests_seen > attempts_during_alarm, 30, "attempts after the alarm"
        )
    finally:
        await dispatcher.stop()

    assert attempts_during_alarm == 1


async def _hostile_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One server, three behaviours by Host: trickles its answer, never answers, or answers
    bytes that are not HTTP."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        host = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"host:")
        )
        if host.startswith("trickle."):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            for _ in range(50):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)
        elif host.startswith("hang."):
            await asyncio.sleep(30)
        else:
            writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, StopIteration):
        pass
    finally:
        writer.close()


async def test_given_a_memory_alarm_and_hostile_receivers_then_nothing_lost_and_a_healthy_receiver_keeps_pace(
    amqp_url: str,
    ingress_settings: IngressSettings,
    worker_settings: WorkerSettings,
    callback_settings: CallbackSettings,
    receiver: CallbackReceiver,
    broker: Broker,
) -> None:
    """Hardening, the chaos test extended: receivers that trickle, hang and answer garbage,
    and a memory alarm in the middle of the load. Every accepted job reaches one terminal
    event, called back to the healthy receiver or parked; none contradicts itself; and the
    healthy receiver gets each callback within 1 s of its event, throughout."""
    rabbitmqctl = _local_broker_control(amqp_url)
    original = await _rabbitmqctl(rabbitmqctl, "eval", "vm_memory_monitor:get_vm_memory_high_watermark().")
    server = await asyncio.start_server(_hostile_receiver, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hostile = [f"http://{name}.test:{port}/cb" for name in ("trickle", "hang", "garbage")]

    async def loopback(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("127.0.0.1")]

    callbacks = replace(
        callback_settings,
        callback_allow=AllowList.parse(["127.0.0.1", "trickle.test", "hang.test", "garbage.test"]),
        callback_timeout_s=1.0,
        callback_max_deferrals=3,
    )
    worker = JobWorker(EchoModel(), worker_settings)
    dispatcher = CallbackDispatcher(callbacks, resolve=loopback)
    await worker.start()
    await dispatcher.start()
    accepted: set[str] = set()
    alarm_refused = 0
    try:
        async with running_ingress(ingress_settings) as client:
            for n in range(60):
                if n == 30:
                    await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", "0.000001")
                if n == 40:
                    await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", original)
                if n % 4 == 0:  # the healthy receiver, through the ingress
                    response = await client.post(
                        "/v1/models/echo/jobs", json={"input": n, "callback_url": receiver.url}
                    )
                    if response.status_code == 202:
                        accepted.add(response.json()["id"])
                    else:
                        assert response.status_code == 503 and response.headers["retry-after"]
                        alarm_refused += 1
                elif not broker.publishing_blocked:  # hostile receivers, straight onto the queue
                    job = Job(
                        id=f"hostile-{n}",
                        model="echo",
                        input=n,
                        callback_url=hostile[n % 4 - 1],
                        submitted_at_ms=int(time.time() * 1000),
                    )
                    with contextlib.suppress(BrokerUnavailable):
                        await broker.publish(job_message(job), "echo", exchange=broker.topology.jobs_exchange)
                        accepted.add(job.id)
                await asyncio.sleep(0.05)
        parked: dict[str, str] = {}

        async def all_terminal() -> bool:
            async with broker.fetching(broker.topology.callbacks_parking_queue) as next_message:
                while (delivery := await next_message()) is not None:
                    events = [c.event for c in decode_callback_deliveries(delivery.body, delivery.type)]
                    parked.update({event.data.id: event.type for event in events})
                    await delivery.ack()
            delivered = {r.event["data"]["id"] for r in receiver.received}
            return accepted <= delivered | set(parked)

        await wait_until(all_terminal, 90, "every accepted job delivered or parked")
    finally:
        await _rabbitmqctl(rabbitmqctl, "set_vm_memory_high_watermark", original)
        await worker.stop()
        await dispatcher.stop()
        server.close()

    events: dict[str, set[str]] = {}
    for record in receiver.received:
        events.setdefault(record.event["data"]["id"], set()).add(record.event["type"])
    for job_id, event_type in parked.items():
        events.setdefault(job_id, set()).add(event_type)
    assert all(len(types) == 1 for types in events.values()), "a job with two different terminal events"
    assert alarm_refused > 0  # the alarm overlapped the load
    assert all(job_id.startswith("hostile-") for job_id in parked)
    lags_s = [
        r.received_wall_s - datetime.fromisoformat(r.event["timestamp"]).timestamp()
        for r in receiver.received
    ]
    print(
        f"\nhostile chaos: accepted {len(accepted)}, delivered {len(receiver.received)}, "
        f"parked {len(parked)}, refused during the alarm {alarm_refused}, "
        f"healthy lag max {max(lags_s) * 1000:.0f} ms, lost 0, contradictions 0"
    )
    assert max(lags_s) < 1.0, f"the healthy receiver waited up to {max(lags_s):.2f} s behind hostile ones"
