"""Chaos on the local three-node cluster with the quorum topology: the node leading the
job queues stops (or is killed) under open-loop load, and comes back.

The whole path runs in this process against all three nodes (AMQP_URL lists them):
the ingress over ASGI, a worker per model, the dispatcher, a real callback receiver.
Every accepted job (202) must reach exactly one terminal event (a duplicate delivery
carries the same webhook-id); what could not be confirmed is answered 503 with
Retry-After, never 202. The broker on 5672 is never touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from ingress.settings import IngressSettings
from job_records.store import JobRecords
from loadgen.callback_receiver import CallbackReceiver
from local_stack.ha_cluster import (
    HaNode,
    kill,
    queue_leaders,
    rabbitmqctl,
    raft_counts,
    start_node,
    wait_until_running,
)
from ray_workers.models.echo import EchoModel
from ray_workers.models.synthetic import SyntheticModel
from ray_workers.settings import WorkerSettings
from tests.conftest import (
    TEST_MODELS,
    callback_settings_for,
    fresh_topology,
    ingress_settings_for,
    queue_holds,
    report_chaos,
    running_ingress,
    running_worker,
    wait_until,
    worker_settings_for,
)
from wire.retry_tiers import RetrySchedule
from wire.topology import Topology

pytestmark = pytest.mark.slow

RATE_PER_S = 50
LOAD_S = 60.0
FAULT_AT_S, RECOVER_AT_S = 20.0, 40.0
PRIORITIES = ("high", "normal", "low")


@dataclasses.dataclass
class Load:
    """What the open-loop submitter saw: each answer, each accepted id, when 202s came."""

    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    accepted: dict[str, int] = dataclasses.field(default_factory=dict)  # id -> attempts it takes
    accepted_at_s: list[float] = dataclasses.field(default_factory=list)
    bad_answers: list[str] = dataclasses.field(default_factory=list)

    def longest_gap_s(self) -> float:
        times = sorted(self.accepted_at_s)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


@pytest.fixture
async def ha_topology(ha_cluster: tuple[HaNode, ...], redis_url: str) -> AsyncIterator[Topology]:
    async with fresh_topology(ha_cluster[0].amqp_url, redis_url, "quorum") as topo:
        yield topo


def _settings(
    urls: str, topology: Topology, redis_url: str, secret: str
) -> tuple[IngressSettings, WorkerSettings, CallbackSettings]:
    return (
        ingress_settings_for(urls, topology, redis_url),
        worker_settings_for(urls, topology, redis_url),
        callback_settings_for(urls, topology, redis_url, secret),
    )


async def _submit(client: httpx.AsyncClient, load: Load, n: int, url: str, started: float) -> None:
    # A fifth of the jobs synthetic, a quarter of those failing once (a retry through a
    # delay tier): few enough that the model's breaker sees a healthy model.
    model, attempts = ("synthetic", 2 if n % 20 == 0 else 1) if n % 5 == 0 else ("echo", 1)
    job_input: Any = {"fail_until_attempt": attempts} if model == "synthetic" else n
    body = {"input": job_input, "callback_url": url, "priority": PRIORITIES[n % 3]}
    response = await client.post(f"/v1/models/{model}/jobs", json=body)
    load.statuses[response.status_code] += 1
    if response.status_code == 202:
        load.accepted[response.json()["id"]] = attempts
        load.accepted_at_s.append(time.monotonic() - started)
    elif response.status_code != 503 or not response.headers.get("retry-after", "").isdigit():
        load.bad_answers.append(f"{response.status_code} {response.headers} {response.text[:200]}")


async def _fault(node: HaNode, action: str) -> None:
    if action == "stop_app":
        await asyncio.to_thread(rabbitmqctl, node, "stop_app")
    else:
        kill(node)


async def _recover(node: HaNode, action: str, nodes: tuple[HaNode, ...]) -> None:
    if action == "stop_app":
        await asyncio.to_thread(rabbitmqctl, node, "start_app")
    else:
        await asyncio.to_thread(start_node, node)
    await asyncio.to_thread(wait_until_running, nodes)


async def _where_jobs_stand(
    load: Load, receiver: CallbackReceiver, topology: Topology, redis_url: str, nodes: tuple[HaNode, ...]
) -> str:
    """Where the accepted jobs without a terminal event stand: their records and the queues."""
    missing = sorted(load.accepted.keys() - {r.event["data"]["id"] for r in receiver.received})
    store = JobRecords(redis_url, topology.prefix, ttl_s=60)
    records = [await store.get(job) for job in missing[:5]]
    await store.close()
    queues = await asyncio.to_thread(raft_counts, nodes[0], topology.prefix)
    return f"{len(missing)} without an ending; the first records: {records}\nqueues:\n{queues}"


def _busiest_leader(nodes: tuple[HaNode, ...], topology: Topology) -> HaNode:
    """The node leading most of the job queues."""
    leaders = queue_leaders(nodes[0])
    counts = Counter(leaders[q] for model in TEST_MODELS for q in topology.job_queues(model))
    name = counts.most_common(1)[0][0]
    return next(node for node in nodes if node.node == name)


@pytest.mark.parametrize("action", ["stop_app", "kill -9"])
async def test_given_the_job_queues_leader_fails_under_load_then_every_accepted_job_ends_once(
    ha_cluster: tuple[HaNode, ...],
    ha_topology: Topology,
    redis_url: str,
    receiver: CallbackReceiver,
    webhook_secret: str,
    action: str,
) -> None:
    urls = ",".join(node.amqp_url for node in ha_cluster)
    ingress, worker, callbacks = _settings(urls, ha_topology, redis_url, webhook_secret)
    load = Load()
    dispatcher = CallbackDispatcher(callbacks)
    await dispatcher.start()
    try:
        async with (
            running_ingress(ingress) as client,
            running_worker(EchoModel(), worker),
            running_worker(SyntheticModel(), worker),
        ):
            victim = _busiest_leader(ha_cluster, ha_topology)
            started = time.monotonic()
            submissions: list[asyncio.Task[None]] = []
            chaos: list[asyncio.Task[None]] = []
            for n in range(int(LOAD_S * RATE_PER_S)):
                # Open loop: the schedule, not the answers, sets the pace.
                await asyncio.sleep(max(0.0, started + n / RATE_PER_S - time.monotonic()))
                submissions.append(asyncio.create_task(_submit(client, load, n, receiver.url, started)))
                elapsed = time.monotonic() - started
                if not chaos and elapsed >= FAULT_AT_S:
                    chaos.append(asyncio.create_task(_fault(victim, action)))
                elif len(chaos) == 1 and elapsed >= RECOVER_AT_S:
                    await chaos[0]
                    chaos.append(asyncio.create_task(_recover(victim, action, ha_cluster)))
            await asyncio.gather(*submissions, *chaos)

            def all_ended() -> bool:
                return load.accepted.keys() <= {r.event["data"]["id"] for r in receiver.received}

            try:
                await wait_until(all_ended, 180, "a terminal event for every accepted job")
            except AssertionError as stalled:
                report = await _where_jobs_stand(load, receiver, ha_topology, redis_url, ha_cluster)
                raise AssertionError(f"{stalled}\n{report}") from None
    finally:
        await dispatcher.stop()

    events: defaultdict[str, set[tuple[str, str]]] = defaultdict(set)
    for r in receiver.received:
        events[r.event["data"]["id"]].add((r.event["type"], r.webhook_id))
    endings = {job: {kind for kind, _ in seen} for job, seen in events.items()}
    deliveries = len(receiver.received)
    report = (
        f"HA chaos ({action} of the leader of the job queues at {FAULT_AT_S:.0f} s, back at "
        f"{RECOVER_AT_S:.0f} s, {RATE_PER_S} jobs/s for {LOAD_S:.0f} s): answers {dict(load.statuses)}, "
        f"accepted {len(load.accepted)}, lost {len(load.accepted.keys() - events.keys())}, "
        f"duplicate deliveries {deliveries - len(events)}, longest time without an accepted publish "
        f"{load.longest_gap_s():.1f} s, called back without a 202 {len(events.keys() - load.accepted.keys())}"
    )
    await report_chaos(report)
    assert not load.bad_answers, load.bad_answers[:3]
    assert load.statuses[202] > 0.8 * LOAD_S * RATE_PER_S, dict(load.statuses)
    assert all(len(kinds) == 1 for kinds in endings.values()), "a job with two different endings"
    assert all(len(seen) == 1 for seen in events.values()), "one event per job, one webhook-id"
    assert all(r.verified for r in receiver.received)
    assert all(r.event["type"] == "job.succeeded" for r in receiver.received)
    retried = [r for r in receiver.received if load.accepted.get(r.event["data"]["id"]) == 2]
    assert retried and all(r.event["data"]["attempts"] == 2 for r in retried)


async def test_given_a_node_stopped_while_jobs_wait_in_retry_tiers_then_each_retry_comes_back(
    ha_cluster: tuple[HaNode, ...],
    ha_topology: Topology,
    redis_url: str,
    receiver: CallbackReceiver,
    webhook_secret: str,
) -> None:
    topology = dataclasses.replace(ha_topology, job_retries=RetrySchedule((8.0,), jitter=0.0))
    urls = ",".join(node.amqp_url for node in ha_cluster)
    ingress, worker, callbacks = _settings(urls, topology, redis_url, webhook_secret)
    # Every job fails its first attempt on purpose: that is not a broken model.
    worker = dataclasses.replace(worker, breaker_failure_threshold=10_000)
    jobs = 60
    tier = topology.job_retry_queue("synthetic", 8.0, "normal")
    dispatcher = CallbackDispatcher(callbacks)
    await dispatcher.start()
    try:
        async with running_ingress(ingress) as client, running_worker(SyntheticModel(), worker):
            for _ in range(jobs):
                body = {"input": {"fail_until_attempt": 2}, "callback_url": receiver.url}
                assert (await client.post("/v1/models/synthetic/jobs", json=body)).status_code == 202
            await wait_until(
                lambda: queue_holds(ha_cluster[0].amqp_url, tier, jobs),
                30,
                f"every job's first failure in {tier}",
            )
            leader_name = queue_leaders(ha_cluster[0])[tier]
            leader = next(node for node in ha_cluster if node.node == leader_name)
            await _fault(leader, "stop_app")
            try:
                received = await receiver.wait_for(jobs, timeout_s=60)
            finally:
                await _recover(leader, "stop_app", ha_cluster)
    finally:
        await dispatcher.stop()

    assert len({r.event["data"]["id"] for r in received}) == jobs
    assert all(r.event["type"] == "job.succeeded" and r.event["data"]["attempts"] == 2 for r in received)
