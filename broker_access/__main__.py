"""`python -m broker_access roles|apply`: the components' broker users.

`roles` prints each role's name and broker user, one per line (cluster-up makes a
password and a Secret `inferq-broker-<role>` for each);
`apply --passwords-dir DIR` grants them, reading each password from DIR/<role>, as the
administrator named by AMQP_URL and RABBITMQ_MANAGEMENT_URL (derived from AMQP_URL when
unset), and declares the topology.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from autoscaler.queue_metrics import management_url_from_amqp
from broker.client import BrokerError
from broker_access.access_setup import apply
from broker_access.management import AccessSetupFailed
from broker_access.roles import roles
from settings.environment import ConfigError, Environment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="broker_access", description="The components' broker users")
    parser.add_argument("command", choices=["roles", "apply"])
    parser.add_argument("--passwords-dir", type=Path, help="apply: a file per role holding its password")
    args = parser.parse_args(argv)
    try:
        read = Environment.read(os.environ)
        topology, models = read.topology(), read.served_models
        if args.command == "roles":
            print("\n".join(f"{role.name} {role.user(topology)}" for role in roles(topology, models)))
            return 0
        if args.passwords_dir is None:
            raise ConfigError("apply needs --passwords-dir: a directory with a file per role")
        management_url = read.rabbitmq_management_url or management_url_from_amqp(read.amqp_url)
        users = asyncio.run(apply(read.amqp_url, management_url, topology, models, args.passwords_dir))
    except (ConfigError, AccessSetupFailed, BrokerError) as exc:
        print(f"broker_access: {exc}", file=sys.stderr)
        return 2
    print(f"granted {len(users)} users their access and declared the topology: {', '.join(users)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
