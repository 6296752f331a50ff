"""Inspecting and replaying parked jobs and callbacks (`task parked`, `task replay`).

Replay moves a message back to where it runs again, keeping its id and its attempt
history and starting its attempts afresh. Each message is republished, confirmed,
and only then acked out of the parking lot, one by one: interrupting a replay leaves
every message in one of the two places (at worst in both, never in neither).

A message read and not moved is put back as a fresh copy at the lot's tail (republished
and confirmed, then the original acked), never handed back unacked: a return counts as
a delivery, and a quorum queue drops a message past its delivery limit when it has no
dead-letter target (RabbitMQ 4.x: 20 by default), so twenty inspections would have
emptied every parking lot. Each pass reads the messages ready when it began, once each,
so their order is kept.

A replay moves one copy of a job (two parked copies of one job are replayed once), and
only a job whose record ended in failure (failed, expired) or has none: a parked copy of
a job that has since succeeded, been canceled or is running again stays parked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker.client import Broker, Delivery, chunk_parts
from broker.settlement import settle
from job_records.store import JobRecords
from wire.envelope import (
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    UndecodableMessage,
    decode_job,
)
from wire.job_chunk import CHUNK_TYPE
from wire.job_message import job_message
from wire.outgoing import OutgoingMessage, Publish
from wire.topology import Topology

REPLAYED_HEADER = "x-replayed"


class ReplayStopped(Exception):
    """A message could not be republished or put back (the broker refused it or went away);
    the pass stops there rather than fetching the same message again."""


@dataclass(frozen=True)
class ParkingLot:
    """One parking lot: a model's jobs, or the callbacks."""

    topology: Topology
    model: str | None  # None: the callbacks parking lot

    @property
    def queue(self) -> str:
        if self.model is None:
            return self.topology.callbacks_parking_queue
        return self.topology.parking_queue(self.model)

    @property
    def exchange(self) -> str:
        """The exchange the lot is filled through (bound by the lot's own name)."""
        if self.model is None:
            return self.topology.callback_outcomes_exchange
        return self.topology.job_outcomes_exchange(self.model)


@dataclass
class ParkingReport:
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    sample: list[tuple[str, str]] = field(default_factory=list)  # (message id, reason)


@dataclass
class Replayed:
    moved: int = 0
    # (message id, why it stayed parked)
    kept: list[tuple[str, str]] = field(default_factory=list)


async def inspect(broker: Broker, lot: ParkingLot, sample_size: int = 5) -> ParkingReport:
    """Count, reasons and a sample; every message read is put back."""
    report = ParkingReport()
    async with broker.fetching(lot.queue) as next_message:
        for _ in range(await _ready(broker, lot)):
            delivery = await next_message()
            if delivery is None:
                break
            reason = str(delivery.headers.get(PARK_REASON_HEADER, "unknown"))
            report.count += 1
            report.reasons[reason.split(":", 1)[0]] += 1
            if len(report.sample) < sample_size:
                report.sample.append((delivery.message_id or "?", reason))
            await _put_back(broker, lot, delivery)
    return report


async def replay(
    broker: Broker,
    lot: ParkingLot,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    records: JobRecords | None = None,
) -> Replayed:
    """Move the parked messages with these ids (all when None) back.

    A replayed job is re-opened on purpose: its record goes back to queued first (its
    ending cleared), so it runs again and may end differently (its callback says so)."""
    wanted = None if ids is None else set(ids)
    result = Replayed()
    moved_ids: set[str] = set()
    async with broker.fetching(lot.queue) as next_message:
        for _ in range(await _ready(broker, lot)):
            delivery = await next_message()
            if delivery is None:
                break
            message_id = delivery.message_id or "unknown"
            selected = wanted is None or message_id in wanted
            if not selected or (limit is not None and result.moved >= limit):
                await _put_back(broker, lot, delivery)
                continue
            if delivery.type == CHUNK_TYPE and lot.model is not None:
                publishes, kept_because = await _replayed_chunk(lot, delivery, moved_ids, records)
            else:
                publish, kept_because = await _replayed(lot, delivery, moved_ids, records)
                publishes = [] if publish is None else [publish]
            if not publishes:
                result.kept.append((message_id, kept_because))
                await _put_back(broker, lot, delivery)
                continue
            if (await settle(broker, [(delivery, publishes)])).acked == 0:
                raise ReplayStopped(f"{message_id} could not be moved; it stays in {lot.queue}")
            moved_ids.update(publish.message.message_id for publish in publishes)
            result.moved += len(publishes)
    return result


async def _replayed(
    lot: ParkingLot, delivery: Delivery, moved_ids: set[str], records: JobRecords | None
) -> tuple[Publish | None, str]:
    """Where the message goes to run again, or None and why it stays parked."""
    if delivery.message_id in moved_ids:
        return None, "another copy of it was replayed in this pass"
    headers = {k: v for k, v in delivery.headers.items() if k != PARK_REASON_HEADER}
    headers[ATTEMPT_HEADER] = 1
    headers[REPLAYED_HEADER] = int(headers.get(REPLAYED_HEADER, 0)) + 1
    if lot.model is None:
        message = OutgoingMessage(
            delivery.body, delivery.message_id or "unknown", headers=headers, type=delivery.type
        )
        return Publish(message, lot.topology.callbacks_queue), ""
    try:
        job = decode_job(delivery.body)
    except UndecodableMessage:
        return None, "its body is not a job this version can run"
    if records is not None:
        status = await records.reopen(job.id)
        if status is not None:
            return None, f"its job is {status} now"
    message = job_message(job, headers, body=delivery.body)
    key = lot.topology.job_routing_key(job.model, job.priority)
    return Publish(message, key, exchange=lot.topology.jobs_exchange), ""


async def _replayed_chunk(
    lot: ParkingLot, chunk: Delivery, moved_ids: set[str], records: JobRecords | None
) -> tuple[list[Publish], str]:
    """A parked chunk (`wire.job_chunk`; a quorum queue dead-letters one delivered too often)
    goes back as its jobs, each one alone and under `_replayed`'s rules; a job that stays
    parked by those rules (it ended or runs again) is not run again, and the chunk leaves
    the lot with the others."""
    parts = chunk_parts(chunk)
    if parts == [chunk]:
        return [], "its body is not a chunk this version can run"
    publishes: list[Publish] = []
    for part in parts:
        publish, _ = await _replayed(lot, part, moved_ids, records)
        if publish is not None:
            publishes.append(publish)
    return publishes, "none of its jobs is to run again"


async def _ready(broker: Broker, lot: ParkingLot) -> int:
    ready, _consumers = await broker.queue_depth(lot.queue)
    return ready


async def _put_back(broker: Broker, lot: ParkingLot, delivery: Delivery) -> None:
    """The message as a fresh copy at the lot's tail, then the original acked."""
    copy = OutgoingMessage(
        delivery.body,
        delivery.message_id or "unknown",
        priority=delivery.priority,
        headers=dict(delivery.headers),
        type=delivery.type,
    )
    if (await settle(broker, [(delivery, [Publish(copy, lot.queue, exchange=lot.exchange)])])).acked == 0:
        raise ReplayStopped(f"{delivery.message_id} could not be put back; it stays in {lot.queue}")
