"""The callback stage's metrics (what the dashboard and the failure-rate alert read): each
attempt counted by outcome and timed, and parked callbacks counted. Real broker, real
receiver; the dispatcher records into a registry the test reads."""

from __future__ import annotations

import time
import uuid

from broker.client import Broker
from callbacks.delivery_metrics import CALLBACK_SERIES, DeliveryMetrics
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from loadgen.callback_receiver import CallbackReceiver
from metrics.series import PrometheusSink
from tests.conftest import wait_until
from wire.callback_events import callback_for
from wire.envelope import Job, JobTimings


async def test_each_attempt_is_counted_by_outcome_and_timed_and_parking_is_counted(
    callback_settings: CallbackSettings, broker: Broker, receiver: CallbackReceiver
) -> None:
    # One answer of each kind, in arrival order: a retryable 503, a final 410, then 200s.
    receiver.scripted_statuses.extend([503, 410])
    timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
    for n in range(3):
        job = Job(id=str(uuid.uuid4()), model="echo", input=n, callback_url=receiver.url, submitted_at_ms=0)
        publish = callback_for(job, "succeeded", 1, timings, time.time(), broker.topology, output=n)
        await broker.publish(publish.message, publish.routing_key)
    sink = PrometheusSink(CALLBACK_SERIES)
    dispatcher = CallbackDispatcher(callback_settings, metrics=DeliveryMetrics(sink))

    def sample(name: str, **labels: str) -> float:
        return sink.registry.get_sample_value(name, labels) or 0.0

    await dispatcher.start()
    try:
        # The 503'd callback comes back from its retry tier and is delivered.
        await wait_until(
            lambda: sample("inferq_callbacks_attempts_total", outcome="delivered") == 2, 20, "two deliveries"
        )
    finally:
        await dispatcher.stop()

    assert sample("inferq_callbacks_attempts_total", outcome="retry") == 1
    assert sample("inferq_callbacks_attempts_total", outcome="refused") == 1
    assert sample("inferq_callbacks_parked_total") == 1
    assert sample("inferq_callbacks_attempt_seconds_count") == 4
    assert len(receiver.received) == 2
