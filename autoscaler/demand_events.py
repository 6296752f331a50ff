"""The local autoscaler's ear for demand events (push activation).

The ingress announces `model.{name}.demand` when it accepts jobs (`ingress.demand`);
here each event wakes its model at once if it sits at zero (`LocalAutoscaler.on_demand`)
instead of at the next poll. Events are acked on arrival: they are hints, and the
polled queue length still wakes a model if one is lost.
"""

from __future__ import annotations

import asyncio
import logging

from autoscaler.loop import LocalAutoscaler
from broker.client import Broker, Delivery

logger = logging.getLogger(__name__)


class DemandListener:
    def __init__(self, broker: Broker, autoscaler: LocalAutoscaler) -> None:
        self._broker = broker
        self._autoscaler = autoscaler
        self._waking: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        topology = self._broker.topology
        await self._broker.subscribe(topology.demand_queue, topology.demand_key("*"), self._on_event)

    async def _on_event(self, delivery: Delivery) -> None:
        model = delivery.body.decode(errors="replace")
        await delivery.ack()
        # Applying replicas takes seconds: the consumer must not wait for it.
        task = asyncio.create_task(self._autoscaler.on_demand(model))
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)
