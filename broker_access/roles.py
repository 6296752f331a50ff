"""Who may do what on the broker: one user per component, each with the least it needs.

RabbitMQ grants three regular expressions per user and virtual host: *configure*
(declare or delete a queue or exchange), *write* (publish to an exchange; bind a queue)
and *read* (consume from a queue; bind from an exchange). Passive declares need none, so
a component that may not declare still checks at start that what it uses exists
(`DECLARE_TOPOLOGY=false`); the topology itself is declared once by `apply`, as the
broker's administrator.

Publishing through the default exchange needs write on `amq.default`, which reaches
every queue of the virtual host; so no component publishes there: a model's worker
sends its outcomes through `job-outcomes.{model}` and the dispatcher its through
`callback-outcomes`, each bound only to the queues that role may fill (see
`wire.topology`). What each role may touch:

| role | configure | write | read |
|---|---|---|---|
| ingress | nothing | `jobs`, `events`, `job-outcomes.*` (a cancel's `job.canceled`) | nothing |
| worker-{model} | nothing | `job-outcomes.{model}` | `jobs.{model}` |
| callbacks | nothing | `callback-outcomes` | `callbacks` |
| push-scaler | its demand queue | its demand queue | `events`, its demand queue |
| monitor | nothing | nothing | nothing; the management API's queue figures (`management` tag) |

The operator's tools (`task parked`, `task replay`) and `apply` run as the
administrator: replaying a parked job publishes into any model's queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wire.topology import Topology

NOTHING = "^$"


@dataclass(frozen=True)
class Role:
    """A component's broker user: its name suffix, permissions and management tags."""

    name: str
    configure: str = NOTHING
    write: str = NOTHING
    read: str = NOTHING
    tags: tuple[str, ...] = ()

    def user(self, topology: Topology) -> str:
        """The broker user name: the queue prefix keeps environments sharing a broker apart."""
        return f"{topology.prefix}inferq-{self.name}"


def _only(*names: str) -> str:
    """A permission pattern matching exactly these resource names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def _with_instances(name: str) -> str:
    """A pattern matching `name` and `name.<instance>` (a push scaler pod's own queue)."""
    return "^" + re.escape(name) + r"(\.[^.]+)?$"


def roles(topology: Topology, models: tuple[str, ...]) -> tuple[Role, ...]:
    """Every component's role for this topology and these models."""
    t = topology
    demand = _with_instances(t.push_scaler_demand_queue)
    outcomes = [t.job_outcomes_exchange(model) for model in models]
    workers = (
        Role(
            f"worker-{model}",
            write=_only(t.job_outcomes_exchange(model)),
            read=_only(*t.job_queues(model), *t.chunk_queues(model)),
        )
        for model in models
    )
    return (
        Role("ingress", write=_only(t.jobs_exchange, t.events_exchange, *outcomes)),
        *workers,
        Role("callbacks", write=_only(t.callback_outcomes_exchange), read=_only(t.callbacks_queue)),
        Role(
            "push-scaler",
            configure=demand,
            write=demand,
            read=f"{_only(t.events_exchange)}|{demand}",
        ),
        # KEDA's scaler and the autoscaler read queue figures from the management API.
        Role("monitor", tags=("management",)),
    )
