"""Inspecting and replaying parked jobs and callbacks (`task parked`, `task replay`).

Replay moves a message back to where it runs again, keeping its id and its attempt
history and starting its attempts afresh. Each message is republished, confirmed,
and only then acked out of the parking lot, one by one: interrupting a replay leaves
every message in one of the two places (at worst in both, never in neither), and a
message not selected goes back to the parking lot in its original order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from contract.broker import Broker, BrokerError, OutgoingMessage
from contract.config import ConfigError, served_models, topology_from_env
from contract.envelope import (
    AMQP_PRIORITY,
    ATTEMPT_HEADER,
    PARK_REASON_HEADER,
    UndecodableMessage,
    decode_job,
)
from contract.topology import Topology

REPLAYED_HEADER = "x-replayed"


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
    broker: Broker, lot: ParkingLot, ids: Sequence[str] | None = None, limit: int | None = None
) -> int:
    """Move the parked messages with these ids (all when None) back; returns how many moved."""
    wanted = None if ids is None else set(ids)
    moved = 0
    async with broker.fetching(lot.queue) as next_message:
        while (limit is None or moved < limit) and (delivery := await next_message()) is not None:
            if wanted is not None and delivery.message_id not in wanted:
                continue  # stays unacked: back to the parking lot when the block ends
            headers = {k: v for k, v in delivery.headers.items() if k != PARK_REASON_HEADER}
            headers[ATTEMPT_HEADER] = 1
            headers[REPLAYED_HEADER] = int(headers.get(REPLAYED_HEADER, 0)) + 1
            message_id = delivery.message_id or "unknown"
            if lot.model is None:
                await broker.publish(
                    OutgoingMessage(delivery.body, message_id, headers=headers), lot.topology.callbacks_queue
                )
            else:
                try:
                    priority = AMQP_PRIORITY[decode_job(delivery.body).priority]
                except UndecodableMessage:
                    continue  # a poison body cannot run again; it stays parked
                await broker.publish(
                    OutgoingMessage(
                        delivery.body,
                        message_id,
                        correlation_id=message_id,
                        priority=priority,
                        headers=headers,
                        type="job",
                    ),
                    lot.model,
                    exchange=lot.topology.jobs_exchange,
                )
            await delivery.ack()
            moved += 1
    return moved


async def _main(args: argparse.Namespace) -> int:
    env = os.environ
    models = served_models(env)
    if args.model is not None and args.model not in models:
        raise ConfigError(f"--model {args.model!r} is not served; served: {list(models)}")
    broker = Broker(
        env.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), topology_from_env(env, models), models
    )
    await broker.connect()
    try:
        lot = ParkingLot(broker.topology, args.model)
        if args.command == "inspect":
            report = await inspect(broker, lot, args.sample)
            print(f"{lot.queue}: {report.count} parked")
            for reason, count in report.reasons.most_common():
                print(f"  {count:>6}  {reason}")
            for message_id, reason in report.sample:
                print(f"  e.g. {message_id}: {reason}")
            return 0
        if not args.all and not args.id:
            raise ConfigError("say which messages to replay: --id ID (repeatable) or --all")
        moved = await replay(broker, lot, None if args.all else args.id, args.limit)
        print(f"replayed {moved} message(s) from {lot.queue}")
        return 0
    finally:
        await broker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parking_lot", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["inspect", "replay"])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a model's parking lot")
    target.add_argument("--callbacks", action="store_true", help="the callbacks parking lot")
    parser.add_argument("--id", action="append", help="replay this message id (repeatable)")
    parser.add_argument("--all", action="store_true", help="replay every parked message")
    parser.add_argument("--limit", type=int, help="replay at most this many")
    parser.add_argument("--sample", type=int, default=5, help="inspect: how many to show")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except (ConfigError, BrokerError) as exc:
        print(f"parking_lot: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
