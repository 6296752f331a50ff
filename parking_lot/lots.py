"""Inspecting and replaying parked jobs and callbacks (`task parked`, `task replay`).

Replay moves a message back to where it runs again, keeping its id and its attempt
history and starting its attempts afresh. Each message is republished, confirmed,
and only then acked out of the parking lot, one by one: interrupting a replay leaves
every message in one of the two places (at worst in both, never in neither), and a
message not selected goes back to the parking lot in its original order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from contract.broker import Broker, OutgoingMessage
from contract.envelope import (
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    UndecodableMessage,
    decode_job,
)
from contract.job_message import job_message
from contract.job_records import JobRecords
from contract.settlement import Publish, settle
from contract.topology import Topology

REPLAYED_HEADER = "x-replayed"


class ReplayStopped(Exception):
    """A message could not be republished (the broker refused it or went away); replay stops
    there rather than fetching the same message again."""


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


@dataclass
class ParkingReport:
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    sample: list[tuple[str, str]] = field(default_factory=list)  # (message id, reason)


async def inspect(broker: Broker, lot: ParkingLot, sample_size: int = 5) -> ParkingReport:
    """Count, reasons and a sample; reads every message and gives all of them back."""
    report = ParkingReport()
    async with broker.fetching(lot.queue) as next_message:
        while (delivery := await next_message()) is not None:
            reason = str(delivery.headers.get(PARK_REASON_HEADER, "unknown"))
            report.count += 1
            report.reasons[reason.split(":", 1)[0]] += 1
            if len(report.sample) < sample_size:
                report.sample.append((delivery.message_id or "?", reason))
    return report


async def replay(
    broker: Broker,
    lot: ParkingLot,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    records: JobRecords | None = None,
) -> int:
    """Move the parked messages with these ids (all when None) back; returns how many moved.

    A replayed job is re-opened on purpose: its record goes back to queued first (its
    ending cleared), so it runs again and may end differently (its callback says so)."""
    wanted = None if ids is None else set(ids)
    moved = 0
    async with broker.fetching(lot.queue) as next_message:
        while (limit is None or moved < limit) and (delivery := await next_message()) is not None:
            if wanted is not None and delivery.message_id not in wanted:
                continue  # stays unacked: back to the parking lot when the block ends
            headers = {k: v for k, v in delivery.headers.items() if k != PARK_REASON_HEADER}
            headers[ATTEMPT_HEADER] = 1
            headers[REPLAYED_HEADER] = int(headers.get(REPLAYED_HEADER, 0)) + 1
            if lot.model is None:
                message = OutgoingMessage(
                    delivery.body, delivery.message_id or "unknown", headers=headers, type=delivery.type
                )
                publish = Publish(message, lot.topology.callbacks_queue)
            else:
                try:
                    job = decode_job(delivery.body)
                except UndecodableMessage:
                    continue  # a poison body cannot run again; it stays parked
                if records is not None:
                    await records.reopen(job.id)
                message = job_message(job, headers, body=delivery.body)
                key = lot.topology.job_routing_key(job.model, job.priority)
                publish = Publish(message, key, exchange=lot.topology.jobs_exchange)
            if (await settle(broker, [(delivery, [publish])])).acked == 0:
                raise ReplayStopped(f"{delivery.message_id} could not be moved; it stays in {lot.queue}")
            moved += 1
    return moved
