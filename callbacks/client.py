"""The one home of the callback HTTP client (aiohttp): one signed POST of an event.

Outcomes, never exceptions, come back to the dispatcher:

    DeliveryResult(delivered=True)                  2xx
    DeliveryResult(retryable=True, ...)             timeout, connection error, 5xx, 429, 408, 3xx,
                                                    a temporary DNS failure
    DeliveryResult(retryable=False, ...)            410 Gone, other 4xx, URL refused by the guard,
                                                    a request the client cannot even build

Pinning: the guard resolves and checks the host before every delivery, and records the
addresses it checked in a `PinnedResolver`; the connector resolves hostnames only
through it, so a connection can only be opened to a checked address and DNS that
changes after the check (rebinding) redirects nothing. The URL keeps its hostname, so
the Host header, TLS server name and certificate check, and the keep-alive pool are all
the hostname's: a connection authenticated as one host is never reused for another.
Kept-alive connections are what let one host take thousands of callbacks a second.

Each attempt has an overall deadline (a receiver trickling its answer cannot hold a
delivery past it), redirects are never followed, and at most RESPONSE_BODY_CAP_BYTES of
the answer is read (the body is not used; a larger one closes the connection).
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from callbacks.signing import WebhookSigner
from policies.callback_guard import (
    AllowList,
    CallbackUrlRejected,
    IPAddress,
    ResolutionUnavailable,
    Resolver,
    check_callback_url,
)
from wire.envelope import CallbackDelivery

USER_AGENT = "inferq-callbacks/1"
RESPONSE_BODY_CAP_BYTES = 64 * 1024
# Bodies past this are streamed (aiohttp's own threshold for its warning is 1 MiB).
STREAMED_BODY_BYTES = 256 * 1024
# Hosts whose checked addresses are remembered for the connector (least recently used go).
PINNED_HOSTS_MAX = 10_000
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    retryable: bool = False
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


class PinnedResolver(AbstractResolver):
    """Resolves a hostname only to the addresses the guard last checked for it."""

    def __init__(self, max_hosts: int = PINNED_HOSTS_MAX) -> None:
        self._checked: OrderedDict[str, tuple[IPAddress, ...]] = OrderedDict()
        self._max_hosts = max_hosts

    def pin(self, host: str, addresses: tuple[IPAddress, ...]) -> None:
        self._checked[host] = addresses
        self._checked.move_to_end(host)
        while len(self._checked) > self._max_hosts:
            self._checked.popitem(last=False)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self._checked.get(host)
        if not addresses:
            # Never falls back to DNS: an unchecked host gets no connection at all.
            raise OSError(f"{host} has no address checked by the callback guard")
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if isinstance(address, ipaddress.IPv6Address) else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        """Nothing to close: no sockets of its own."""


class CallbackClient:
    def __init__(
        self,
        signer: WebhookSigner,
        allow: AllowList,
        timeout_s: float,
        max_connections: int,
        max_connections_per_host: int,
        resolve: Resolver,
    ) -> None:
        self._signer = signer
        self._allow = allow
        self._resolve = resolve
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._max_connections_per_host = max_connections_per_host
        self._pins = PinnedResolver()
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        """The session is made on first use, inside the running event loop, as aiohttp wants."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=self._pins,
                use_dns_cache=False,  # the pins are the only answers, checked per delivery
                limit=self._max_connections,
                limit_per_host=self._max_connections_per_host,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=False, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(self, delivery: CallbackDelivery) -> DeliveryResult:
        if delivery.callback_url is None:
            return DeliveryResult(delivered=False, retryable=False, error="refused: no callback URL")
        try:
            target = await check_callback_url(delivery.callback_url, self._allow, self._resolve)
            url = URL(delivery.callback_url, encoded=False)
        except CallbackUrlRejected as exc:
            return DeliveryResult(delivered=False, retryable=False, error=f"refused: {exc}")
        except ResolutionUnavailable as exc:
            return DeliveryResult(delivered=False, retryable=True, error=f"dns: {exc}")
        except ValueError as exc:
            return DeliveryResult(delivered=False, retryable=False, error=f"refused: unusable URL: {exc}")
        if url.raw_host:
            self._pins.pin(url.raw_host, target.addresses)
        body = msgspec.json.encode(delivery.event)
        headers = {
            **self._signer.headers(delivery.webhook_id, int(time.time()), body),
            "content-type": "application/json",
            "user-agent": USER_AGENT,
        }
        try:
            # A large body goes out as a stream, in chunks: written in one go it holds the
            # event loop (and aiohttp warns so).
            payload: bytes | io.BytesIO = io.BytesIO(body) if len(body) > STREAMED_BODY_BYTES else body
            async with self._open_session().post(
                url, data=payload, headers=headers, allow_redirects=False
            ) as response:
                await _discard_body(response)
                return classify_response(response.status, response.headers.get("retry-after"))
        except TimeoutError as exc:
            return DeliveryResult(delivered=False, retryable=True, error=f"timeout: {exc!r}")
        except aiohttp.InvalidURL as exc:
            return DeliveryResult(delivered=False, retryable=False, error=f"refused: unusable URL: {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            return DeliveryResult(delivered=False, retryable=True, error=f"transport: {exc!r}")


async def _discard_body(response: aiohttp.ClientResponse) -> None:
    """Read (and drop) a small answer so the connection stays alive; a large one is cut."""
    read = 0
    while read <= RESPONSE_BODY_CAP_BYTES:
        chunk = await response.content.readany()
        if not chunk:
            return
        read += len(chunk)
    response.close()


def classify_response(status: int, retry_after: str | None) -> DeliveryResult:
    """Delivered on 2xx; retried on 3xx (redirects are not followed), 408, 429 and 5xx; every
    other answer is final. Retry-After is kept for the retry tier to honour."""
    if 200 <= status < 300:
        return DeliveryResult(delivered=True, status=status)
    retryable = status >= 500 or status in (408, 429) or 300 <= status < 400
    return DeliveryResult(
        delivered=False,
        retryable=retryable,
        status=status,
        error=f"receiver answered {status}",
        retry_after_s=retry_after_s(retry_after),
    )


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date; None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
