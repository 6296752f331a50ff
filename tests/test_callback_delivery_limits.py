"""The callback client against real local servers that misbehave: what one attempt may
cost, and which connection it may use (hardening items 5, 6 and 11)."""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from aiohttp import web

from broker.client import Broker
from callbacks.client import CallbackClient, DeliveryResult
from callbacks.dispatcher import CallbackDispatcher
from callbacks.settings import CallbackSettings
from callbacks.signing import WebhookSigner, generate_secret
from policies.callback_guard import AllowList, IPAddress, Resolver
from tests.conftest import serving, wait_until
from wire.callback_events import callback_for
from wire.envelope import PARK_REASON_HEADER, CallbackDelivery, Job, JobTimings, decode_callback_delivery
from wire.outgoing import Publish
from wire.topology import Topology

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: StreamHandler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)


def _callback(url: str, topology: Topology) -> Publish:
    job = Job(id=str(uuid.uuid4()), model="echo", input=1, callback_url=url, submitted_at_ms=0)
    timings = JobTimings(queued_ms=0, inference_ms=0, batch_size=1)
    return callback_for(job, "succeeded", 1, timings, time.time(), topology, output=1)


def _delivery(url: str) -> CallbackDelivery:
    return decode_callback_delivery(_callback(url, Topology()).message.body)


async def _no_dns(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"no lookup expected for {host}")


def _client(
    timeout_s: float, resolve: Resolver = _no_dns, allow: tuple[str, ...] = ("127.0.0.1",)
) -> CallbackClient:
    return CallbackClient(
        WebhookSigner(generate_secret()),
        AllowList.parse(allow),
        timeout_s,
        max_connections=8,
        max_connections_per_host=8,
        resolve=resolve,
    )


async def _deliver_once(url: str, timeout_s: float) -> tuple[DeliveryResult, float]:
    client = _client(timeout_s)
    started = time.monotonic()
    try:
        result = await client.deliver(_delivery(url))
    finally:
        await client.close()
    return result, time.monotonic() - started


async def test_given_a_receiver_trickling_its_answer_then_the_attempt_ends_at_its_deadline() -> None:
    """Item 6: the timeout bounds the whole attempt, not the gap between bytes."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        try:
            for _ in range(100):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.3)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async with raw_server(trickle) as port:
        result, elapsed_s = await _deliver_once(f"http://127.0.0.1:{port}/cb", timeout_s=1.0)

    assert result.retryable and not result.delivered and "timeout" in str(result.error)
    assert elapsed_s < 3.0  # 100 bytes at 0.3 s each would take 30 s


async def test_given_a_huge_answer_then_at_most_a_small_part_is_read_and_the_callback_counts() -> None:
    """Item 6: the answer's body is not buffered; past a small cap the connection is dropped."""
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n")
        chunk = b"\0" * 65536
        try:
            while sent < 64 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async with raw_server(flood) as port:
        result, _ = await _deliver_once(f"http://127.0.0.1:{port}/cb", timeout_s=10.0)

    assert result.delivered
    assert sent < 16 * 1024 * 1024, f"{sent} bytes went out before the client hung up"


async def test_given_two_hostnames_on_one_address_then_each_has_its_own_connections_and_host_header() -> None:
    """Item 11: connections are kept per hostname, never reused across hostnames sharing an
    address (with TLS the certificate checked is the hostname's own)."""
    seen: list[tuple[str, int]] = []

    async def record(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen.append((request.host.split(":")[0], peer[1] if peer else -1))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/cb", record)

    async def loopback(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("127.0.0.1")]

    client = _client(5.0, loopback, allow=("a.test", "b.test"))
    async with serving(app) as port:
        try:
            for host in ("a.test", "a.test", "b.test", "a.test"):
                result = await client.deliver(_delivery(f"http://{host}:{port}/cb"))
                assert result.delivered, result
        finally:
            await client.close()

    hosts = [host for host, _ in seen]
    assert hosts == ["a.test", "a.test", "b.test", "a.test"]
    a_ports = {peer for host, peer in seen if host == "a.test"}
    b_ports = {peer for host, peer in seen if host == "b.test"}
    assert len(a_ports) == 1  # kept alive for a.test
    assert not a_ports & b_ports  # b.test never rode a.test's connection


async def test_given_an_error_nobody_expected_then_the_callback_is_parked_with_it_not_left_unsettled(
    callback_settings: CallbackSettings, broker: Broker
) -> None:
    """Item 5: whatever escapes a delivery is caught at its boundary and parks the callback."""

    async def exploding(host: str, port: int) -> list[IPAddress]:
        raise RuntimeError("resolver exploded")

    publish = _callback("http://hooks.example.com/cb", broker.topology)
    await broker.publish(publish.message, publish.routing_key)
    dispatcher = CallbackDispatcher(replace(callback_settings, callback_allow=AllowList()), resolve=exploding)
    await dispatcher.start()
    reasons: list[str] = []
    try:

        async def parked() -> bool:
            async with broker.fetching(broker.topology.callbacks_parking_queue) as next_message:
                while (delivery := await next_message()) is not None:
                    reasons.append(str(delivery.headers.get(PARK_REASON_HEADER)))
                    await delivery.ack()
            return bool(reasons)

        await wait_until(parked, 10, "the callback in the parking lot")
    finally:
        await dispatcher.stop()

    assert reasons == [reasons[0]] and "unexpected error" in reasons[0] and "resolver exploded" in reasons[0]
    ready, _ = await broker.queue_depth(broker.topology.callbacks_queue)
    assert ready == 0


async def test_given_an_ipv6_literal_callback_url_then_the_host_header_is_the_bracketed_literal() -> None:
    """Review item 21: the connection goes to the checked address, so the Host header must still
    be the URL's own authority: for an IPv6 literal, `[::1]:port` (RFC 9110 7.2). A real
    server on ::1 records what arrived."""
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = next(
            int(v)
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(record, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    client = _client(5.0, allow=("[::1]",))
    try:
        result = await client.deliver(_delivery(f"http://[::1]:{port}/hook"))
    finally:
        await client.close()
        server.close()

    assert result.delivered, result.error
    [head] = heads
    host_lines = [line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")]
    assert host_lines == [f"Host: [::1]:{port}".encode()]
