"""Queue topology: names and arguments of every exchange and queue, as data.

Both sides declare the same specs idempotently at start, so whichever starts first
creates them and a mismatch fails loudly (PRECONDITION_FAILED) instead of drifting.

Broker versions: the embedded default is RabbitMQ 3.10, production clusters run 4.x.
Main queues are *classic* queues with `x-max-priority`, which both versions honour.
Quorum queues would replicate, but on 3.10 they reject `x-max-priority` outright and
on 4.x they support only two priority levels (>= 5 is "high"), so the three-level
high/normal/low contract needs classic queues on both. `x-overflow: reject-publish`
(not the default drop-head) makes a full queue nack new publishes instead of
silently dropping the oldest accepted jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.envelope import MAX_AMQP_PRIORITY


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    # (exchange, routing key) pairs; the default exchange needs no binding.
    bindings: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Topology:
    """Derives every name from an optional prefix, which isolates environments (and tests)
    sharing one virtual host."""

    prefix: str = ""
    max_queue_length: int = 100_000

    @property
    def jobs_exchange(self) -> str:
        return f"{self.prefix}jobs"

    def main_queue(self, model: str) -> str:
        return f"{self.prefix}jobs.{model}"

    def parking_queue(self, model: str) -> str:
        return f"{self.prefix}jobs.{model}.parked"

    @property
    def callbacks_queue(self) -> str:
        return f"{self.prefix}callbacks"

    @property
    def callbacks_parking_queue(self) -> str:
        return f"{self.prefix}callbacks.parked"

    def queues(self, models: tuple[str, ...]) -> list[QueueSpec]:
        specs: list[QueueSpec] = []
        for model in models:
            specs.append(
                QueueSpec(
                    self.main_queue(model),
                    {
                        "x-queue-type": "classic",
                        "x-max-priority": MAX_AMQP_PRIORITY,
                        "x-max-length": self.max_queue_length,
                        "x-overflow": "reject-publish",
                    },
                    ((self.jobs_exchange, model),),
                )
            )
            specs.append(QueueSpec(self.parking_queue(model), {"x-queue-type": "classic"}))
        specs.append(QueueSpec(self.callbacks_queue, {"x-queue-type": "classic"}))
        specs.append(QueueSpec(self.callbacks_parking_queue, {"x-queue-type": "classic"}))
        return specs
