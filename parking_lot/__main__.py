"""`python -m parking_lot inspect|replay` (`task parked`, `task replay`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from broker.client import Broker, BrokerError
from job_records.store import JobRecords, RecordsUnavailable
from parking_lot.lots import ParkingLot, ReplayStopped, inspect, replay
from settings.environment import ConfigError, Environment


async def _main(args: argparse.Namespace) -> int:
    read = Environment.read(os.environ)
    models = read.served_models
    if args.model is not None and args.model not in models:
        raise ConfigError(f"--model {args.model!r} is not served; served: {list(models)}")
    broker = Broker(read.amqp_url, read.topology(), models, role="parking-lot")
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
        url = read.records_url
        records = None if url is None else JobRecords(url, read.queue_prefix, read.result_ttl_s)
        try:
            replayed = await replay(broker, lot, None if args.all else args.id, args.limit, records)
        finally:
            if records is not None:
                await records.close()
        print(f"replayed {replayed.moved} message(s) from {lot.queue}")
        for message_id, why in replayed.kept:
            print(f"  kept {message_id}: {why}")
        return 0
    finally:
        await broker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="parking_lot", description="Inspect or replay parked jobs and callbacks"
    )
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
    except (ConfigError, BrokerError, ReplayStopped, RecordsUnavailable) as exc:
        print(f"parking_lot: {exc}", file=sys.stderr)
        return 2


sys.exit(main())
