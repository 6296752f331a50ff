"""Adaptive batching live in a worker, against the real broker: the size grows under a
backlog, every job is settled exactly once, and the metrics say what happened."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from broker.client import Broker
from model_catalogue.sections import Batching
from ray_workers.job_worker import JobWorker
from ray_workers.settings import WorkerSettings
from tests.conftest import callbacks_in, drain_queue, running_worker, wait_until
from tests.models import LinearLatencyModel, ShortChangingModel
from wire.envelope import Job
from wire.job_message import job_message


async def _publish_jobs(settings: WorkerSettings, count: int) -> set[str]:
    broker = Broker(settings.amqp_url, settings.topology, settings.models)
    await broker.connect()
    ids = set()
    try:
        for n in range(count):
            job = Job(
                id=str(uuid.uuid4()),
                model="echo",
                input=n,
                callback_url="http://127.0.0.1:9/",
                submitted_at_ms=int(time.time() * 1000),
            )
            await broker.publish(
                job_message(job),
                job.model,
                exchange=settings.topology.jobs_exchange,
            )
            ids.add(job.id)
    finally:
        await broker.close()
    return ids


async def _callback_ids(settings: WorkerSettings) -> list[str]:
    messages = await drain_queue(settings.amqp_url, settings.topology.callbacks_queue)
    return [callback.event.data.id for callback in callbacks_in(messages)]


async def _callbacks(settings: WorkerSettings, expected: int) -> list[str]:
    seen: list[str] = []

    async def all_there() -> bool:
        seen.extend(await _callback_ids(settings))
        return len(seen) >= expected

    await wait_until(all_there, 60, f"{expected} callbacks on the queue")
    return seen


async def _after_stop(settings: WorkerSettings) -> tuple[list[str], int]:
    """Once the worker has stopped: callbacks published late (a duplicate would be here),
    and jobs left on the main queue (one not acked would run again)."""
    left = await drain_queue(settings.amqp_url, settings.topology.main_queue("echo"))
    return await _callback_ids(settings), len(left)


def _sample(worker: JobWorker, name: str, labels: dict[str, str]) -> float:
    value = worker.metrics.sink.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return float(value or 0.0)


async def test_given_a_backlog_then_batches_grow_under_the_target_and_each_job_settles_once(
    worker_settings: WorkerSettings,
) -> None:
    settings = replace(worker_settings, batching=Batching(max_size=64, latency_target_ms=30))
    ids = await _publish_jobs(settings, 400)
    # 2 ms + 0.4 ms per job: batches up to ~70 stay under 30 ms.
    async with running_worker(LinearLatencyModel(0.002, 0.0004), settings) as worker:
        seen = await _callbacks(settings, len(ids))
    late, unacked = await _after_stop(settings)

    assert sorted(seen + late) == sorted(ids), "every job called back exactly once"
    assert unacked == 0
    assert worker.batching.size >= 32
    batches = _sample(worker, "inferq_worker_batch_size_count", {"model": "echo"})
    assert batches < 400 / 8, f"{batches} batches for 400 jobs: batching did not grow"
    assert (
        _sample(worker, "inferq_worker_batch_adjustments_total", {"model": "echo", "adjustment": "grow"}) >= 5
    )
    assert _sample(worker, "inferq_worker_jobs_total", {"model": "echo", "outcome": "succeeded"}) == 400


async def test_given_a_worker_started_then_its_breaker_state_is_exported_before_any_change(
    worker_settings: WorkerSettings,
) -> None:
    """The dashboard's breaker panel and InferqModelBreakerOpen read this gauge; exported
    only on a change, it had no series on a healthy cluster (found by the rehearsal)."""
    async with running_worker(LinearLatencyModel(0.0, 0.0), worker_settings) as worker:
        state = worker.metrics.sink.registry.get_sample_value(  # type: ignore[attr-defined]
            "inferq_worker_breaker_state", {"model": "echo"}
        )

    assert state == 0.0


async def test_given_a_slow_model_then_the_controller_backs_off_to_meet_the_target(
    worker_settings: WorkerSettings,
) -> None:
    settings = replace(worker_settings, batching=Batching(max_size=64, latency_target_ms=20))
    ids = await _publish_jobs(settings, 150)
    # 1 ms per job: only batches of <= 19 meet 20 ms.
    async with running_worker(LinearLatencyModel(0.0, 0.001), settings) as worker:
        seen = await _callbacks(settings, len(ids))

    assert sorted(seen) == sorted(ids)
    assert (
        _sample(worker, "inferq_worker_batch_adjustments_total", {"model": "echo", "adjustment": "backoff"})
        >= 1
    )
    assert worker.batching.size <= 24


async def test_given_a_wrong_length_result_then_every_job_of_the_batch_settles_once(
    worker_settings: WorkerSettings,
) -> None:
    settings = replace(worker_settings, breaker_failure_threshold=1000)  # this test is not about the breaker
    ids = await _publish_jobs(settings, 12)
    async with running_worker(ShortChangingModel(0.0, 0.0), settings):
        seen = await _callbacks(settings, len(ids))
        parked = []

        async def all_parked() -> bool:
            parked.extend(
                await drain_queue(worker_settings.amqp_url, worker_settings.topology.parking_queue("echo"))
            )
            return len(parked) >= len(ids)

        await wait_until(all_parked, 30, "every job in the parking lot")
    late, unacked = await _after_stop(settings)
    parked += await drain_queue(settings.amqp_url, settings.topology.parking_queue("echo"))

    assert sorted(seen + late) == sorted(ids), "one job.failed callback per job, no more"
    assert sorted(str(m.message_id) for m in parked) == sorted(ids), "each job parked once"
    assert unacked == 0
    assert "outputs for" in str(parked[0].headers["x-attempt-history"])
