"""Fair share between tenants: lanes in the topology, the lane each tenant's jobs take
(leased in the real Redis, read against the real broker's depths), the worker's inbox
serving tenants in turn by weight, and end to end over HTTP: one tenant's backlog does
not hold another's job back, where one lane (first come first served) does."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, cast

import httpx
import pytest

from broker.client import Broker, Delivery
from ingress.settings import IngressSettings
from ingress.tenant_lanes import TenantLanes, hashed_lane
from job_records.store import JobRecords
from model_catalogue.sections import Batching
from ray_workers.priority_inbox import PriorityInbox
from ray_workers.settings import WorkerSettings
from tenants.registry import Tenant, key_digest
from tests.conftest import jobs_held, running_ingress, running_worker, wait_until
from wire.envelope import AMQP_PRIORITY, TENANT_HEADER, TENANT_WEIGHT_HEADER, Job
from wire.job_chunk import CHUNK_JOBS
from wire.job_message import job_message
from wire.topology import Topology

BIG_KEY = "big-tenant-key-0123456789"
SMALL_KEY = "small-tenant-key-0123456789"
# Two chunks' worth (`wire.job_chunk`).
BACKLOG = 2 * CHUNK_JOBS


def test_lanes_are_queues_beside_lane_0_and_retries_come_back_to_lane_0() -> None:
    classic = Topology(prefix="p.", tenant_lanes=3)
    specs = {spec.name: spec for spec in classic.queues(("echo",))}

    assert classic.job_queues("echo") == (
        "p.jobs.echo.high",
        "p.jobs.echo.high.lane1",
        "p.jobs.echo.high.lane2",
        "p.jobs.echo",
        "p.jobs.echo.lane1",
        "p.jobs.echo.lane2",
    )
    assert classic.high_queues("echo") == classic.job_queues("echo")[:3]
    assert [classic.job_routing_key("echo", "low", lane) for lane in range(3)] == [
        "echo",
        "echo.lane1",
        "echo.lane2",
    ]
    assert classic.job_routing_key("echo", "high", 2) == "echo.high.lane2"
    assert specs["p.jobs.echo.lane2"].bindings == (("p.jobs", "echo.lane2"),)
    assert specs["p.jobs.echo.lane2"].arguments == specs["p.jobs.echo"].arguments
    assert specs[classic.job_retry_queue("echo", 1.0, "low")].arguments["x-dead-letter-routing-key"] == "echo"

    quorum = Topology(prefix="p.", queue_type="quorum", tenant_lanes=2)
    assert quorum.job_queues("echo") == (
        "p.jobs.echo.high",
        "p.jobs.echo.high.lane1",
        "p.jobs.echo.normal",
        "p.jobs.echo.normal.lane1",
        "p.jobs.echo.low",
        "p.jobs.echo.low.lane1",
    )
    assert quorum.lane_queues("echo", 1) == (
        "p.jobs.echo.high.lane1",
        "p.jobs.echo.normal.lane1",
        "p.jobs.echo.low.lane1",
    )
    assert quorum.job_routing_key("echo", "low", 1) == "echo.low.lane1"
    with pytest.raises(ValueError, match="tenant_lanes=0"):
        Topology(tenant_lanes=0)


@dataclasses.dataclass(frozen=True)
class _Prefetched:
    priority: int
    n: int
    headers: Mapping[str, Any]


def _prefetched(n: int, tenant: str, weight: float = 1.0, priority: str = "normal") -> Delivery:
    headers: dict[str, Any] = {TENANT_HEADER: tenant}
    if weight != 1.0:
        headers[TENANT_WEIGHT_HEADER] = weight
    return cast(Delivery, _Prefetched(AMQP_PRIORITY[priority], n, headers))


def _served(inbox: PriorityInbox, count: int) -> list[int]:
    return [cast(_Prefetched, inbox.get_nowait()).n for _ in range(count)]


def test_the_inbox_serves_tenants_in_turn_by_weight_and_priorities_strictly() -> None:
    inbox = PriorityInbox()
    for n in range(100, 130):  # a backlog of "big" (weight 3), then "small" arrives
        inbox.put_nowait(_prefetched(n, "big", weight=3))
    for n in range(1, 11):
        inbox.put_nowait(_prefetched(n, "small"))

    first_eight = _served(inbox, 8)
    inbox.put_nowait(_prefetched(7000, "big", priority="high"))
    after = _served(inbox, 1)

    assert sorted(first_eight) == [1, 2, 100, 101, 102, 103, 104, 105]  # 3 : 1
    assert [n for n in first_eight if n < 100] == [1, 2] and first_eight[0] == 100  # in arrival order
    assert after == [7000]  # a high job before every normal one, whoever's
    assert inbox.qsize() == 40 + 1 - 9


def test_a_tenant_that_was_idle_is_served_next_but_earns_no_credit() -> None:
    inbox = PriorityInbox()
    for n in range(100, 140):
        inbox.put_nowait(_prefetched(n, "big"))
    assert _served(inbox, 20) == list(range(100, 120))

    for n in range(1, 4):
        inbox.put_nowait(_prefetched(n, "trickle"))

    assert _served(inbox, 6) == [1, 120, 2, 121, 3, 122]


@pytest.fixture
async def broker(amqp_url: str, topology: Topology) -> Any:
    lanes = dataclasses.replace(topology, tenant_lanes=3)
    client = Broker(amqp_url, lanes, ("echo",), role="ingress")
    await client.connect()
    yield client
    await client.close()


async def _ready(broker: Broker, queue: str) -> int:
    ready, _consumers = await broker.queue_depth(queue)
    return ready


async def test_each_tenant_leases_the_emptiest_lane_and_every_ingress_agrees(
    broker: Broker, topology: Topology, redis_url: str
) -> None:
    lanes = dataclasses.replace(topology, tenant_lanes=3)
    for n in range(5):  # lane 0 has a backlog
        await broker.publish(
            job_message(Job(id=f"j{n}", model="echo", input=n, submitted_at_ms=0)),
            lanes.job_queue("echo", "normal", 0),
        )
    await wait_until(
        lambda: _ready_is(broker, lanes.job_queue("echo", "normal", 0), 5), 10, "lane 0's backlog"
    )
    key_prefix = f"{topology.prefix}{uuid.uuid4().hex[:6]}."
    records, other_records = JobRecords(redis_url, key_prefix, 60), JobRecords(redis_url, key_prefix, 60)
    one, other = (TenantLanes(lanes, r, lambda q: _ready(broker, q)) for r in (records, other_records))
    try:
        first = await one.lane("echo", "first")
        second = await other.lane("echo", "second")
        third = await one.lane("echo", "third")
        again = [await other.lane("echo", "first"), await one.lane("echo", "second")]
    finally:
        await records.close()
        await other_records.close()
    without_redis = TenantLanes(lanes, None, lambda q: _ready(broker, q))

    assert (first, second) == (1, 2)  # the empty lanes, in order, before the deep one
    assert third == 0  # every lane holds one tenant but lane 0: fewest tenants first
    assert again == [1, 2]  # another ingress process sees the same leases
    assert await without_redis.lane("echo", "first") == hashed_lane("first", 3)
    assert len({hashed_lane(f"t{n}", 3) for n in range(30)}) == 3


async def _ready_is(broker: Broker, queue: str, count: int) -> bool:
    return await _ready(broker, queue) == count


class _OrderingModel:
    """Echo that notes the order it ran inputs in, at about 1 ms an input."""

    name = "echo"

    def __init__(self) -> None:
        self.ran: list[Any] = []
        self._lock = threading.Lock()

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        time.sleep(0.001 * len(inputs))
        with self._lock:
            self.ran.extend(inputs)
        return list(inputs)


async def _small_tenants_place(
    ingress_settings: IngressSettings, worker_settings: WorkerSettings, lanes: int, chunked: bool
) -> tuple[int, int]:
    """BACKLOG jobs of the big tenant queued, then the small tenant's job (with `chunked`,
    the first of a chunk's worth, so that both wait in chunk queues); a worker started
    after: where among the jobs run the small one ran, and jobs left queued."""
    topology = dataclasses.replace(ingress_settings.topology, tenant_lanes=lanes)
    tenants = (Tenant("big", key_digest(BIG_KEY)), Tenant("small", key_digest(SMALL_KEY)))
    ingress = dataclasses.replace(ingress_settings, topology=topology, named_tenants=tenants)
    fixed = Batching(adaptive=False, max_size=4, max_wait_ms=1)
    worker = dataclasses.replace(worker_settings, topology=topology, batching=fixed, batching_by_model={})
    model = _OrderingModel()
    small_jobs = ["small", *(f"small-{n}" for n in range(1, CHUNK_JOBS))] if chunked else ["small"]
    async with running_ingress(ingress) as client:
        await _submit_backlog(client, BIG_KEY, [n for n in range(BACKLOG)], chunked)
        await _submit_backlog(client, SMALL_KEY, small_jobs, chunked)
        async with running_worker(model, worker):
            await wait_until(lambda: len(model.ran) == BACKLOG + len(small_jobs), 30, "every job to run")
        left = await jobs_held(ingress.amqp_url, topology, "echo")
    return model.ran.index("small"), left


async def _submit_backlog(client: httpx.AsyncClient, key: str, inputs: list[Any], chunked: bool) -> None:
    """`inputs` as batches: of CHUNK_JOBS (chunks, `wire.job_chunk`) or of one job fewer
    (each job a message of its own)."""
    size = CHUNK_JOBS if chunked else CHUNK_JOBS - 1
    for first in range(0, len(inputs), size):
        batch = {"jobs": [{"input": value} for value in inputs[first : first + size]]}
        answer = await client.post("/v1/models/echo/jobs/batch", json=batch, headers=_auth(key))
        assert answer.status_code == 202, answer.text


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("chunked", [False, True], ids=["jobs", "chunks"])
async def test_given_a_tenants_backlog_then_another_tenants_job_runs_within_the_first_batches(
    ingress_settings: IngressSettings, worker_settings: WorkerSettings, chunked: bool
) -> None:
    place_in_lanes, left_in_lanes = await _small_tenants_place(ingress_settings, worker_settings, 4, chunked)
    place_in_one_queue, left_in_one = await _small_tenants_place(
        ingress_settings, worker_settings, 1, chunked
    )

    assert place_in_lanes < 8, f"the small tenant's job ran {place_in_lanes + 1}th of {BACKLOG + 1}"
    assert place_in_one_queue == BACKLOG  # first come first served: behind the whole backlog
    assert left_in_lanes == left_in_one == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["jobs", "chunks"])
async def test_given_two_tenants_backlogs_then_they_are_served_in_proportion_to_their_weights(
    ingress_settings: IngressSettings, worker_settings: WorkerSettings, chunked: bool
) -> None:
    """Weight 3 against weight 1, both with a backlog queued before the worker starts: of
    the first 40 jobs run, about three in four are the heavier tenant's, and each tenant's
    jobs run in the order they were submitted."""
    tenants = (Tenant("big", key_digest(BIG_KEY), weight=3), Tenant("small", key_digest(SMALL_KEY)))
    ingress = dataclasses.replace(ingress_settings, named_tenants=tenants)
    fixed = Batching(adaptive=False, max_size=4, max_wait_ms=1)
    worker = dataclasses.replace(worker_settings, batching=fixed, batching_by_model={})
    model = _OrderingModel()
    async with running_ingress(ingress) as client:
        for key, tag in ((BIG_KEY, "big"), (SMALL_KEY, "small")):
            await _submit_backlog(client, key, [f"{tag}-{n}" for n in range(BACKLOG)], chunked)
        async with running_worker(model, worker):
            await wait_until(lambda: len(model.ran) == 2 * BACKLOG, 30, "every job to run")

    first = model.ran[:40]
    heavy = sum(1 for value in first if value.startswith("big-"))
    assert 27 <= heavy <= 33, f"{heavy} of the first 40 were the weight-3 tenant's: {first}"
    assert [v for v in model.ran if v.startswith("big-")] == [f"big-{n}" for n in range(BACKLOG)]
