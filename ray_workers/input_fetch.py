"""A job's `input_url`, fetched by the worker through the callback-URL guard (aiohttp).

The guard resolves the host and refuses private, loopback, link-local and metadata
addresses unless CALLBACK_ALLOW_HOSTS names them; the connection goes only to the
addresses it checked (`PinnedResolver`: DNS that changes after the check redirects
nothing). Redirects are not followed (a redirect could lead anywhere the guard did not
look). The body is read a chunk at a time into one buffer, refused past UPLOAD_MAX_BYTES,
within one overall deadline.

    Fetched(data=...)                         200
    Fetched(error=..., permanent=True)        refused by the guard, 3xx, 4xx (but 408, 429),
                                              over the size limit
    Fetched(error=..., permanent=False)       timeout, connection error, 5xx, 408, 429, DNS
                                              failing for now
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from yarl import URL

from callbacks.client import PinnedResolver
from policies.callback_guard import (
    AllowList,
    CallbackUrlRejected,
    ResolutionUnavailable,
    Resolver,
    check_callback_url,
)

USER_AGENT = "inferq-worker/1"
READ_CHUNK_BYTES = 2**20
RETRYABLE_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Fetched:
    data: bytearray | None = None
    error: str | None = None
    permanent: bool = False


class InputFetcher:
    """One worker's fetches; `close` when done."""

    def __init__(self, allow: AllowList, resolve: Resolver, max_bytes: int, timeout_s: float) -> None:
        self._allow = allow
        self._resolve = resolve
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._pins = PinnedResolver()
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self._pins, use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> Fetched:
        try:
            target = await check_callback_url(url, self._allow, self._resolve, "input_url")
            parsed = URL(url, encoded=False)
        except CallbackUrlRejected as exc:
            return Fetched(error=f"refused: {exc}", permanent=True)
        except ResolutionUnavailable as exc:
            return Fetched(error=f"input_url: {exc}")
        except ValueError as exc:
            return Fetched(error=f"refused: input_url is not usable: {exc}", permanent=True)
        if parsed.raw_host:
            self._pins.pin(parsed.raw_host, target.addresses)
        try:
            async with self._open_session().get(
                parsed, allow_redirects=False, headers={"user-agent": USER_AGENT}
            ) as response:
                return await self._read(url, response)
        except TimeoutError as exc:
            return Fetched(error=f"input_url {url}: timed out: {exc!r}")
        except aiohttp.InvalidURL as exc:
            return Fetched(error=f"refused: input_url is not usable: {exc}", permanent=True)
        except (aiohttp.ClientError, OSError) as exc:
            return Fetched(error=f"input_url {url}: {exc!r}")

    async def _read(self, url: str, response: aiohttp.ClientResponse) -> Fetched:
        status = response.status
        if status != 200:
            permanent = 300 <= status < 500 and status not in RETRYABLE_STATUSES
            why = "redirects are not followed" if 300 <= status < 400 else "expected 200"
            return Fetched(error=f"input_url {url} answered {status} ({why})", permanent=permanent)
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            return Fetched(error=self._too_large(url, declared), permanent=True)
        data = bytearray(declared or 0)
        received = 0
        while chunk := await response.content.read(READ_CHUNK_BYTES):
            if received + len(chunk) > self._max_bytes:
                return Fetched(error=self._too_large(url, received + len(chunk)), permanent=True)
            data[received : received + len(chunk)] = chunk  # fills the buffer, or grows it
            received += len(chunk)
        return Fetched(data=data)

    def _too_large(self, url: str, size: int) -> str:
        return f"input_url {url} holds at least {size} bytes, over UPLOAD_MAX_BYTES ({self._max_bytes})"
