"""A worker or dispatcher stopping while the broker stops answering: its consumer's
cancel and its channels' and connections' closes give up after SHUTDOWN_RPC_TIMEOUT_S
instead of waiting for ever. The real broker sits behind a loopback relay that stops
passing bytes on, as a stalled node or a black-holed link would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

import broker.client
from broker.client import Broker, Delivery
from ray_workers.settings import WorkerSettings


class _StallingRelay:
    """Relays TCP to the broker until `stall()`: from then on it reads and passes nothing."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._pumps: set[asyncio.Task[None]] = set()

    def stall(self) -> None:
        self._flowing.clear()

    async def serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection(*self._target)
        self._writers += [client_writer, broker_writer]
        for source, sink in ((client_reader, broker_writer), (broker_reader, client_writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()

    async def close(self) -> None:
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._writers:
            writer.close()


@contextlib.asynccontextmanager
async def _relayed(amqp_url: str) -> AsyncIterator[tuple[str, _StallingRelay]]:
    """An AMQP URL through a relay on a loopback port of its own, and the relay."""
    parts = urlsplit(amqp_url)
    relay = _StallingRelay(parts.hostname or "127.0.0.1", parts.port or 5672)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    credentials = parts.netloc.rpartition("@")[0]
    url = urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{port}"))
    try:
        yield url, relay
    finally:
        server.close()
        await relay.close()
        await server.wait_closed()


async def test_given_a_broker_that_stops_answering_then_cancel_and_close_give_up_within_their_bound(
    worker_settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound_s = 0.5
    monkeypatch.setattr(broker.client, "SHUTDOWN_RPC_TIMEOUT_S", bound_s)
    inbox: asyncio.Queue[Delivery] = asyncio.Queue()
    async with _relayed(worker_settings.amqp_url) as (url, relay):
        stalled = Broker(url, worker_settings.topology, worker_settings.models)
        await stalled.connect()
        consumer = await stalled.consume(worker_settings.topology.callbacks_parking_queue, 10, inbox.put)
        relay.stall()

        started = time.monotonic()
        async with asyncio.timeout(20 * bound_s):  # unbounded, these would wait for ever
            await stalled.cancel(consumer)
            cancelled_s = time.monotonic() - started
            await stalled.close()
        closed_s = time.monotonic() - started

    # One bound for the cancel; then one each for its channel and the two connections.
    assert bound_s <= cancelled_s < 2 * bound_s
    assert closed_s < 6 * bound_s
