"""The callback stage alone: how fast one dispatcher delivers to one host, and whether a slow
host slows another.

The callbacks queue is prefilled with callback events as workers send them (a message
per batch and host), then one CallbackDispatcher (in this process, default settings)
delivers them to receivers in processes of their own: a no-op receiver (answers 204 at
once) for capacity, and a receiver that answers after 2 s on another loopback address
for isolation.

The slow host's callbacks are also work: on a box whose cores the dispatcher already
fills, any second host's deliveries take CPU from the first. So the fast host's rate
beside the slow host is compared twice: with its rate alone (what the user sees), and
with its rate beside a second *fast* host given the same number of callbacks (the
same work, no slowness), which isolates what the slowness itself costs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from callbacks.signing import generate_secret
from loadgen.measurement import bench_topology, median
from loadgen.receiver_process import ReceiverProcess
from policies.callback_guard import AllowList
from wire.callback_events import callback_for, combine_callbacks
from wire.envelope import Job, JobTimings
from wire.topology import Topology

DELIVERY_WAIT_S = 120.0
PUBLISH_WINDOW = 256
SLOW_HOST = "127.0.0.3"
OTHER_FAST_HOST = "127.0.0.4"
SLOW_ANSWER_S = 2.0
# About what an echo worker's batch sends to one host at a backlog here (mean batch 33-43).
EVENTS_PER_MESSAGE = 32
# More than the slow host's slots (it saturates and deliveries wait for it in memory),
# within its share of the prefetch window (none bounces through a delay tier).
SLOW_HOST_CALLBACKS = 200


async def _prefill(broker: Broker, topology: Topology, targets: list[tuple[str, int]]) -> list[set[str]]:
    """Queue deliveries as workers send them at a backlog (EVENTS_PER_MESSAGE of one host's
    events per message), interleaved over `(url, count)` targets; returns the webhook ids
    per target."""
    ids: list[set[str]] = [set() for _ in targets]
    timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
    publishes = []
    for first in range(0, max(count for _, count in targets), EVENTS_PER_MESSAGE):
        for index, (url, count) in enumerate(targets):
            events = []
            for n in range(first, min(count, first + EVENTS_PER_MESSAGE)):
                job = Job(id=str(uuid.uuid4()), model="echo", input=n, callback_url=url, submitted_at_ms=0)
                events.append(callback_for(job, "succeeded", 1, timings, time.time(), topology, output=n))
                ids[index].add(events[-1].message.message_id)
            if events:
                publishes.append(combine_callbacks(events))
    for start in range(0, len(publishes), PUBLISH_WINDOW):
        window = publishes[start : start + PUBLISH_WINDOW]
        await asyncio.gather(*(broker.publish(p.message, p.routing_key) for p in window))
    return ids


async def deliver_rates(
    settings: CallbackSettings, targets: list[tuple[ReceiverProcess, int]]
) -> list[float]:
    """Deliveries/s reaching each target's receiver, from its first to its last, measured
    until the first target has all of its deliveries (the others may still be waiting)."""
    topology = bench_topology()
    run_settings = replace(settings, topology=topology)
    broker = Broker(settings.amqp_url, topology, ())
    await broker.connect()
    dispatcher = CallbackDispatcher(run_settings)
    try:
        already = [len(await receiver.refresh()) for receiver, _ in targets]
        ids = await _prefill(broker, topology, [(receiver.url, count) for receiver, count in targets])
        await dispatcher.start()
        fast_receiver = targets[0][0]
        if not await fast_receiver.wait_for(ids[0], DELIVERY_WAIT_S):
            raise TimeoutError(f"{len(ids[0])} callbacks were not delivered within {DELIVERY_WAIT_S} s")
    finally:
        await dispatcher.stop(drain_timeout_s=0)
        await broker.delete_topology()
        await broker.close()
    rates = []
    for (receiver, _), seen, start in zip(targets, ids, already, strict=True):
        times = sorted(r.received_wall_s for r in (await receiver.refresh())[start:] if r.webhook_id in seen)
        span_s = times[-1] - times[0] if len(times) > 1 else float("nan")
        rates.append((len(times) - 1) / span_s)
    return rates


async def measure_callbacks(amqp_url: str, reps: int, count: int) -> dict[str, Any]:
    """Dispatch capacity to one no-op host, and a fast host's rate beside a 2 s host."""
    settings = CallbackSettings(
        amqp_url=amqp_url,
        webhook_secret=generate_secret(),
        models=(),
        callback_allow=AllowList.parse(["127.0.0.1", SLOW_HOST, OTHER_FAST_HOST]),
    )
    fast = ReceiverProcess(None)
    slow = ReceiverProcess(None, host=SLOW_HOST, delay_s=SLOW_ANSWER_S)
    other_fast = ReceiverProcess(None, host=OTHER_FAST_HOST)
    receivers = (fast, slow, other_fast)
    for receiver in receivers:
        await receiver.start()
    alone, beside_slow, beside_fast = [], [], []
    try:
        await deliver_rates(settings, [(fast, min(count, 300))])  # warm-up
        for _ in range(reps):
            alone.append((await deliver_rates(settings, [(fast, count)]))[0])
            beside_slow.append(
                (await deliver_rates(settings, [(fast, count), (slow, SLOW_HOST_CALLBACKS)]))[0]
            )
            beside_fast.append(
                (await deliver_rates(settings, [(fast, count), (other_fast, SLOW_HOST_CALLBACKS)]))[0]
            )
    finally:
        for receiver in receivers:
            await receiver.stop()
    return {
        "deliveries_per_run": count,
        "slow_host_callbacks": SLOW_HOST_CALLBACKS,
        "capacity_per_s": median(alone),
        "fast_beside_slow_per_s": median(beside_slow),
        "fast_beside_fast_per_s": median(beside_fast),
        "slow_host_ratio": median([b / a for a, b in zip(alone, beside_slow, strict=True)]),
        "slow_vs_same_load_ratio": median([s / f for s, f in zip(beside_slow, beside_fast, strict=True)]),
        "runs": {"alone": alone, "beside_slow": beside_slow, "beside_fast": beside_fast},
    }
