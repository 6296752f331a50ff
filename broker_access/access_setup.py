"""`apply`: the virtual host, one user per component, their permissions, the topology.

Run once per bring-up (and again after a model is added: it is idempotent, and a
re-run sets each user's password to the one given, which is how they rotate). It runs
as the broker's administrator, the only identity here allowed to declare: the
components then start with DECLARE_TOPOLOGY=false and their own users.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from autoscaler.queue_metrics import vhost_from_amqp
from broker.client import Broker
from broker_access.management import AccessSetupFailed, ManagementAdmin
from broker_access.roles import Role, roles
from wire.topology import Topology

EVERYTHING = ".*"


def read_passwords(directory: Path, wanted: tuple[Role, ...]) -> dict[str, str]:
    """Each role's password from the file named after it (a mounted Secret's layout)."""
    passwords = {}
    for role in wanted:
        path = directory / role.name
        try:
            password = path.read_text().strip()
        except OSError as exc:
            raise AccessSetupFailed(f"no password for role {role.name}: cannot read {path} ({exc})") from exc
        if len(password) < 16:
            raise AccessSetupFailed(f"the password in {path} is shorter than 16 characters")
        passwords[role.name] = password
    return passwords


async def apply(
    amqp_url: str, management_url: str, topology: Topology, models: tuple[str, ...], passwords_dir: Path
) -> list[str]:
    """Grant every role its access, then declare the topology; returns the users set."""
    wanted = roles(topology, models)
    passwords = read_passwords(passwords_dir, wanted)
    admin = ManagementAdmin(management_url)
    vhost = vhost_from_amqp(amqp_url)
    admin.ensure_vhost(vhost)
    admin.grant(vhost, admin.whoami(), EVERYTHING, EVERYTHING, EVERYTHING)
    for role in wanted:
        user = role.user(topology)
        admin.ensure_user(user, passwords[role.name], role.tags)
        admin.grant(vhost, user, role.configure, role.write, role.read)
    broker = Broker(
        amqp_url, dataclasses.replace(topology, declared_by_clients=True), models, role="broker-access"
    )
    await broker.connect()
    await broker.close()
    return [role.user(topology) for role in wanted]
