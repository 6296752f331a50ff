"""Callback batches: a worker's batch sends its events for one callback host as one
callbacks-queue message; the dispatcher gives each event its own outcome and settles the
message once; `settle` acks a delivery only once the combined message carrying its event
is confirmed. Real broker, real receiver."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import aio_pika.abc

from broker.client import Broker, Delivery
from broker.settlement import settle
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from loadgen.callback_receiver import CallbackReceiver
from model_catalogue.sections import Batching
from ray_workers.models.echo import EchoModel
from ray_workers.settings import WorkerSettings
from tests.conftest import callbacks_in, drain_queue, running_worker, wait_until
from wire.callback_events import callback_for, callback_host, combine_callbacks
from wire.envelope import (
    ATTEMPT_HEADER,
    CALLBACK_BATCH_TYPE,
    PARK_REASON_HEADER,
    Job,
    JobTimings,
    decode_callback_delivery,
)
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage, Publish

TIMINGS = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)


def _job(callback_url: str, n: int = 0) -> Job:
    return Job(
        id=str(uuid.uuid4()),
        model="echo",
        input=n,
        callback_url=callback_url,
        submitted_at_ms=int(time.time() * 1000),
    )


def _callback(broker: Broker, url: str, n: int = 0) -> Publish:
    return callback_for(_job(url, n), "succeeded", 1, TIMINGS, time.time(), broker.topology, output=n)


async def test_given_a_batch_of_jobs_for_two_hosts_then_each_host_gets_its_events_in_few_messages(
    worker_settings: WorkerSettings, broker: Broker
) -> None:
    settings = replace(worker_settings, batching=Batching(adaptive=False, max_size=12))
    jobs = [_job("http://127.0.0.1:9/a", n) for n in range(8)]
    jobs += [_job("http://localhost:9/b", n) for n in range(4)]
    for job in jobs:
        await broker.publish(job_message(job), "echo", exchange=broker.topology.jobs_exchange)
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def all_called_back() -> bool:
        messages.extend(await drain_queue(settings.amqp_url, settings.topology.callbacks_queue))
        return len(callbacks_in(messages)) >= len(jobs)

    async with running_worker(EchoModel(), settings):
        await wait_until(all_called_back, 20, "an event for every job")

    events = callbacks_in(messages)
    assert sorted(e.event.data.id for e in events) == sorted(j.id for j in jobs)  # each exactly once
    batches = [m for m in messages if m.type == CALLBACK_BATCH_TYPE]
    assert batches, "a batch of 12 jobs to two hosts went out one message per event"
    assert len(messages) < len(jobs)
    for message in messages:  # never two hosts in one message
        hosts = {callback_host(e.callback_url or "") for e in callbacks_in([message])}
        assert len(hosts) == 1, hosts


async def test_given_a_batch_message_with_mixed_answers_then_each_event_gets_its_own_outcome(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    """Of four events in one message: two delivered at once, one retried on its own (503),
    one parked on its own (410); the message is settled once, and nothing is left over."""
    receiver.scripted_statuses.extend([503, 410])
    settings = replace(callback_settings, callback_host_concurrency=1, callback_concurrency=1)
    publishes = [_callback(broker, receiver.url, n) for n in range(4)]
    ids = {p.message.message_id for p in publishes}
    batch = combine_callbacks(publishes)
    assert batch.message.type == CALLBACK_BATCH_TYPE
    await broker.publish(batch.message, batch.routing_key)

    dispatcher = CallbackDispatcher(settings)
    await dispatcher.start()
    try:
        received = await receiver.wait_for(3, timeout_s=20)
        parked = await _wait_for_parked(callback_settings.amqp_url, broker, 1)
    finally:
        await dispatcher.stop()

    first_two = ids - {received[-1].webhook_id, decode_callback_delivery(parked[0].body).webhook_id}
    assert {r.webhook_id for r in received[:2]} == first_two  # one request at a time: 503, 410, then these
    assert len({r.webhook_id for r in received} | {parked[0].message_id}) == 4  # every event, once
    assert all(r.verified for r in received)
    assert receiver.requests_seen == 5  # 4 first attempts and the 503's second
    # The parked event is a message of its own, as a single event would be.
    assert parked[0].type == "job.succeeded"
    assert parked[0].headers[PARK_REASON_HEADER] == "receiver answered 410"
    assert parked[0].headers[ATTEMPT_HEADER] == 1
    assert await broker.queue_depth(broker.topology.callbacks_queue) == (0, 0)
    assert dispatcher.slots.hosts_tracked == 0


async def _wait_for_parked(
    amqp_url: str, broker: Broker, count: int
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    parked: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def enough() -> bool:
        parked.extend(await drain_queue(amqp_url, broker.topology.callbacks_parking_queue))
        return len(parked) >= count

    await wait_until(enough, 20, f"{count} parked callback(s)")
    return parked


async def test_given_the_combined_message_is_refused_then_every_delivery_it_carries_is_requeued(
    amqp_url: str, broker: Broker
) -> None:
    """`settle` with `combine`: three deliveries' events go as one message; when that one is
    refused, all three go back to their queue, and a delivery with only its own message is
    acked."""
    source = broker.topology.callbacks_parking_queue  # a queue of the test's own topology
    for n in range(4):
        await broker.publish(OutgoingMessage(str(n).encode(), message_id=f"job-{n}"), source)
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    consumer = await broker.consume(source, 10, inbox.put)
    await wait_until(lambda: inbox.qsize() == 4, 10, "four deliveries")
    deliveries = [inbox.get_nowait() for _ in range(4)]
    events = [replace(_callback(broker, "http://127.0.0.1:9/x", n), routing_key="nowhere") for n in range(3)]
    alone = Publish(OutgoingMessage(b"kept", message_id="own"), broker.topology.callbacks_queue)
    combined: list[Sequence[Publish]] = []

    def combine(publishes: Sequence[Publish]) -> Publish:
        combined.append(publishes)
        return combine_callbacks(publishes)

    outcomes = [(delivery, [event]) for delivery, event in zip(deliveries, events, strict=False)]
    settled = await settle(broker, [*outcomes, (deliveries[3], [alone])], combine=combine)
    await broker.cancel(consumer, close_channel=True)

    assert [len(c) for c in combined] == [3]  # one message for the three events
    assert (settled.acked, settled.requeued + settled.redelivered) == (1, 3)
    requeued = Counter(m.message_id for m in await drain_queue(amqp_url, source))
    assert requeued == Counter({"job-0": 1, "job-1": 1, "job-2": 1})
    kept = await drain_queue(amqp_url, broker.topology.callbacks_queue)
    assert [m.body for m in kept] == [b"kept"]
