"""One model's job loop: consume, batch, infer, and hand each outcome on durably.

Ack ordering is the guarantee: a job is acked only after its outcome is confirmed by
the broker, either as a callback delivery on the callbacks queue or as a parked
message. A crash anywhere before that leaves the job unacked, and the broker gives it
to another consumer (at-least-once; a duplicate carries the same webhook-id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from contract.broker import Broker, BrokerError, Delivery, OutgoingMessage
from contract.envelope import (
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    CallbackDelivery,
    CallbackEvent,
    EventData,
    EventType,
    Job,
    JobTimings,
    UndecodableMessage,
    decode_job,
    encode,
    webhook_id_for,
)
from ray_workers.batching import collect_batch
from ray_workers.models.base import InvalidInput, Model, ModelError
from ray_workers.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass
class _Work:
    """One decoded job of a batch and, once known, its outcome."""

    delivery: Delivery
    job: Job
    attempt: int
    prepared: Any = None
    output: Any = None
    error: str | None = None


class JobWorker:
    """Owns its broker connection and the batch loop for one model."""

    def __init__(
        self, model: Model, settings: WorkerSettings, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self._model = model
        self._settings = settings
        self._wall_clock = wall_clock
        self._broker = Broker(settings.amqp_url, settings.topology, settings.models)
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._consumer_tag: str | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def is_healthy(self) -> bool:
        running = self._loop_task is not None and not self._loop_task.done()
        return running and self._broker.is_ready

    async def start(self) -> None:
        await self._broker.connect()
        self._loop_task = asyncio.create_task(self._run(), name=f"job-loop-{self._model.name}")
        # Prefetch equals the batch size: a replica holds at most one batch beyond the
        # one it runs, which bounds how long a high-priority job can wait behind it.
        self._consumer_tag = await self._broker.consume(
            self._settings.topology.main_queue(self._model.name),
            self._settings.batch_max_size,
            self._inbox.put,
        )
        logger.info("worker for %s consuming", self._model.name)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking work, let the batch in flight finish (bounded), give the rest back."""
        timeout_s = self._settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self._consumer_tag is not None:
            await self._broker.cancel(self._consumer_tag)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout_s)
        except TimeoutError:
            logger.warning(
                "drain of %s timed out after %.1f s; its batch goes back to the queue",
                self._model.name,
                timeout_s,
            )
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        # Closing the channels returns every unacked message (prefetched, in the inbox
        # or in an abandoned batch) to the queue.
        await self._broker.close()

    async def _run(self) -> None:
        while True:
            batch = await collect_batch(
                self._inbox, self._settings.batch_max_size, self._settings.batch_max_wait_s
            )
            self._idle.clear()
            try:
                await self._process(batch)
            finally:
                self._idle.set()

    async def _process(self, batch: list[Delivery]) -> None:
        started_ms = self._wall_clock() * 1000
        work: list[_Work] = []
        settles = []
        for delivery in batch:
            try:
                job = decode_job(delivery.body)
            except UndecodableMessage as exc:
                settles.append(self._park(delivery, str(exc)))
                continue
            item = _Work(delivery, job, int(delivery.headers.get(ATTEMPT_HEADER, 1)))
            try:
                item.prepared = self._model.prepare(job.input, item.attempt)
            except InvalidInput as exc:
                item.error = str(exc)
            work.append(item)
        runnable = [item for item in work if item.error is None]
        inference_ms = await self._infer(runnable)
        for item in work:
            timings = JobTimings(
                queued_ms=round(max(0.0, started_ms - item.job.submitted_at_ms), 3),
                inference_ms=round(inference_ms, 3),
                batch_size=len(runnable),
            )
            settles.append(self._complete(item, timings))
        await asyncio.gather(*settles)

    async def _infer(self, runnable: Sequence[_Work]) -> float:
        """Run the model on the batch off the event loop; record outputs or errors."""
        if not runnable:
            return 0.0
        started = time.monotonic()
        try:
            outputs = await asyncio.to_thread(self._model.predict, [w.prepared for w in runnable])
            if len(outputs) != len(runnable):
                raise ModelError(f"model returned {len(outputs)} outputs for {len(runnable)} inputs")
        except ModelError as exc:
            logger.warning("batch of %d for %s failed: %s", len(runnable), self._model.name, exc)
            for item in runnable:
                item.error = str(exc)
        except Exception:
            logger.exception("model %s raised unexpectedly", self._model.name)
            for item in runnable:
                item.error = "internal model error"
        else:
            for item, output in zip(runnable, outputs, strict=True):
                item.output = output
        return (time.monotonic() - started) * 1000

    async def _complete(self, item: _Work, timings: JobTimings) -> None:
        job = item.job
        event_type: EventType = "job.failed" if item.error is not None else "job.succeeded"
        event = CallbackEvent(
            type=event_type,
            timestamp=datetime.fromtimestamp(self._wall_clock(), UTC).isoformat(),
            data=EventData(
                id=job.id,
                model=job.model,
                status="failed" if item.error is not None else "succeeded",
                attempts=item.attempt,
                metadata=job.metadata,
                timings=timings,
                output=item.output,
                error=item.error,
            ),
        )
        delivery = CallbackDelivery(
            webhook_id=webhook_id_for(job.id, event_type), callback_url=job.callback_url, event=event
        )
        message = OutgoingMessage(
            encode(delivery), message_id=delivery.webhook_id, correlation_id=job.id, type=event_type
        )
        await self._settle(item.delivery, message, self._settings.topology.callbacks_queue)

    async def _park(self, delivery: Delivery, reason: str) -> None:
        logger.warning("parking undecodable message %s: %s", delivery.message_id, reason)
        message = OutgoingMessage(
            delivery.body,
            message_id=delivery.message_id or "unknown",
            headers={**delivery.headers, PARK_REASON_HEADER: reason},
        )
        await self._settle(delivery, message, self._settings.topology.parking_queue(self._model.name))

    async def _settle(self, delivery: Delivery, outcome: OutgoingMessage, queue: str) -> None:
        """The one place a job is settled: its outcome is made durable, then it is acked."""
        try:
            await self._broker.publish(outcome, queue)
            await delivery.ack()
        except BrokerError as exc:
            # Unacked: the broker redelivers it after the connection recovers.
            logger.warning("job %s left unacked for redelivery: %s", delivery.message_id, exc)
