"""Per-host back-pressure in the callback stage: a busy host's deliveries wait in memory
for a slot instead of lapping through a delay tier. Real broker, real receiver."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from broker.client import Broker
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from loadgen.callback_receiver import CallbackReceiver, ReceivedCallback
from tests.conftest import wait_until
from wire.callback_events import callback_for
from wire.envelope import PARK_REASON_HEADER, Job, JobTimings


async def _queue_callbacks(broker: Broker, url: str, count: int) -> set[str]:
    timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
    publishes = [
        callback_for(
            Job(id=str(uuid.uuid4()), model="echo", input=n, callback_url=url, submitted_at_ms=0),
            "succeeded",
            1,
            timings,
            time.time(),
            broker.topology,
            output=n,
        )
        for n in range(count)
    ]
    await asyncio.gather(*(broker.publish(p.message, p.routing_key) for p in publishes))
    return {p.message.message_id for p in publishes}


async def _dispatch_all(
    settings: CallbackSettings, receiver: CallbackReceiver, count: int, timeout_s: float
) -> tuple[CallbackDispatcher, list[ReceivedCallback]]:
    """Run a dispatcher until `count` callbacks reached the receiver; stopped however it ends."""
    dispatcher = CallbackDispatcher(settings)
    await dispatcher.start()
    try:
        return dispatcher, await receiver.wait_for(count, timeout_s=timeout_s)
    finally:
        await dispatcher.stop()


async def test_given_a_backlog_to_one_host_then_callbacks_wait_for_its_slots_not_a_delay_tier(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    settings = replace(callback_settings, callback_concurrency=8, callback_host_concurrency=4)
    receiver.response_delay_s = 0.1
    expected = await _queue_callbacks(broker, receiver.url, 40)

    dispatcher, received = await _dispatch_all(settings, receiver, 40, timeout_s=20)

    assert sorted(r.webhook_id for r in received) == sorted(expected)  # each exactly once
    assert all(r.verified for r in received)
    assert receiver.max_concurrent == 4  # the host's bound was used, and never exceeded
    assert dispatcher.deferrals == 0  # nothing went round a delay tier
    assert receiver.requests_seen == 40


async def test_given_a_host_over_its_share_of_the_window_then_the_excess_is_deferred_and_delivered(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    # A prefetch of 8 lets one host hold 4 deliveries; the rest of the window stays free
    # for other hosts, and what does not fit waits in a delay tier (no attempt spent).
    settings = replace(
        callback_settings, callback_concurrency=2, callback_host_concurrency=2, callback_prefetch=8
    )
    receiver.response_delay_s = 0.2
    expected = await _queue_callbacks(broker, receiver.url, 12)

    dispatcher, received = await _dispatch_all(settings, receiver, 12, timeout_s=30)

    assert sorted(r.webhook_id for r in received) == sorted(expected)
    assert dispatcher.deferrals > 0
    assert receiver.max_concurrent <= 2
    assert dispatcher.slots.hosts_tracked == 0  # nothing left held once all is delivered


async def test_given_a_host_whose_breaker_stays_open_then_deferrals_are_capped_and_the_rest_parked(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    """Hardening item 7: deferrals spend no attempt but are counted; past the cap a delivery
    is parked with the reason, not republished every few seconds for weeks."""
    settings = replace(
        callback_settings,
        callback_breaker_threshold=1,
        callback_breaker_cooldown_s=60.0,  # stays open for the whole test
        callback_max_deferrals=2,
        callback_concurrency=1,
        callback_host_concurrency=1,
    )
    receiver.scripted_statuses.extend([503] * 10)
    expected = await _queue_callbacks(broker, receiver.url, 4)
    dispatcher = CallbackDispatcher(settings)
    await dispatcher.start()
    parked: list[str] = []
    try:

        async def all_parked() -> bool:
            async with broker.fetching(settings.topology.callbacks_parking_queue) as next_message:
                while (delivery := await next_message()) is not None:
                    parked.append(str(delivery.headers.get(PARK_REASON_HEADER)))
                    await delivery.ack()
            return len(parked) >= 4

        await wait_until(all_parked, 20, "every callback parked after its deferrals")
    finally:
        await dispatcher.stop()

    # Only the first reached the host (its 503 opened the breaker); its retry, like the
    # three others, was then deferred twice and parked.
    assert receiver.requests_seen == 1
    assert len(parked) == len(expected) == 4
    assert all(reason.startswith("deferred 2 times") for reason in parked), parked
    assert dispatcher.deferrals == 8
