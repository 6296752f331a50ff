"""`python -m push_scaler`: the KEDA external push scaler, until SIGTERM.

Hears the ingress's demand events on its own queue (`events.demand.push-scaler`, or
`events.demand.push-scaler.<PUSH_SCALER_INSTANCE>` for each of several) and
answers KEDA over gRPC on PUSH_SCALER_HOST:PUSH_SCALER_PORT. A broker that is not up
yet is retried; events are hints, so a lost one costs KEDA's next poll, no more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from broker.client import Broker, BrokerUnavailable, Delivery, redact_url
from push_scaler.demand_window import DemandWindow
from push_scaler.scaler_service import DemandScaler, serve
from settings.environment import ConfigError, Environment

logger = logging.getLogger("push_scaler")

BROKER_RETRY_INTERVAL_S = 1.0
STOP_GRACE_S = 5.0


async def _subscribe_until_ready(broker: Broker, scaler: DemandScaler, url: str, instance: str) -> None:
    async def on_event(delivery: Delivery) -> None:
        await delivery.ack()
        scaler.on_demand(delivery.body.decode(errors="replace"))

    topology = broker.topology
    while True:
        try:
            await broker.connect()
            queue = topology.push_scaler_instance_queue(instance)
            await broker.subscribe(queue, topology.demand_key("*"), on_event)
            logger.info("hearing demand events at %s", redact_url(url))
            return
        except BrokerUnavailable as exc:
            logger.warning("broker not ready, retrying in %.0f s: %s", BROKER_RETRY_INTERVAL_S, exc)
            await broker.close()
            await asyncio.sleep(BROKER_RETRY_INTERVAL_S)


async def run(read: Environment) -> None:
    scaler = DemandScaler(DemandWindow(read.push_scaler_active_s), read.served_models)
    broker = Broker(read.amqp_url, read.topology(), read.served_models, role="push-scaler")
    server, port = await serve(scaler, read.push_scaler_host, read.push_scaler_port)
    logger.info("KEDA external push scaler on %s:%d", read.push_scaler_host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    subscribing = asyncio.create_task(
        _subscribe_until_ready(broker, scaler, read.amqp_url, read.push_scaler_instance)
    )
    try:
        await stop.wait()
    finally:
        subscribing.cancel()
        await server.stop(STOP_GRACE_S)
        await broker.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        read = Environment.read(os.environ)
    except ConfigError as exc:
        print(f"push_scaler: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(read))
    return 0


if __name__ == "__main__":
    sys.exit(main())
