"""A job's `input_url`, fetched by the worker through the callback-URL guard (aiohttp).

The guard resolves the host and refuses private, loopback, link-local and metadata
addresses unless CALLBACK_ALLOW_HOSTS names them; the connection goes only to the
addresses it checked (`PinnedResolver`: DNS that changes after the check redirects
nothing). Redirects are not followed (a redirect could lead anywhere the guard did not
look). The body is refused past UPLOAD_MAX_BYTES. `fetch` reads it whole, into one
buffer, within one overall deadline; `chunks` hands it on a chunk at a time (a JSON Lines
job), within a deadline for each read instead: the reader may take long over the whole.

    FetchFailed(permanent=True)    refused by the guard, 3xx, 4xx (but 408, 429), over the
                                   size limit
    FetchFailed(permanent=False)   timeout, connection error, 5xx, 408, 429, DNS failing
                                   for now
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

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


class FetchFailed(Exception):
    """The input could not be fetched; `permanent` when trying again cannot help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class InputFetcher:
    """One worker's fetches; `close` when done."""

    def __init__(self, allow: AllowList, resolve: Resolver, max_bytes: int, timeout_s: float) -> None:
        self._allow = allow
        self._resolve = resolve
        self._max_bytes = max_bytes
        self._whole = aiohttp.ClientTimeout(total=timeout_s)
        self._each_read = aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s)
        self._pins = PinnedResolver()
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self._pins, use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> bytearray:
        """The whole body, in one buffer of its declared size (grown when it has none)."""
        async with self._opened(url, self._whole) as (declared, body):
            data = bytearray(declared or 0)
            received = 0
            async for chunk in body:
                data[received : received + len(chunk)] = chunk  # fills the buffer, or grows it
                received += len(chunk)
        return data

    async def chunks(self, url: str) -> AsyncGenerator[bytes, None]:
        """The body a chunk at a time; FetchFailed, also midway."""
        async with self._opened(url, self._each_read) as (_, body):
            async for chunk in body:
                yield chunk

    @contextlib.asynccontextmanager
    async def _opened(
        self, url: str, limits: aiohttp.ClientTimeout
    ) -> AsyncIterator[tuple[int | None, AsyncGenerator[bytes, None]]]:
        """The answer's declared length and its body's chunks, every failure a FetchFailed."""
        parsed = await self._checked(url)
        try:
            async with self._open_session().get(
                parsed, allow_redirects=False, headers={"user-agent": USER_AGENT}, timeout=limits
            ) as response:
                self._check_answer(url, response)
                yield response.content_length, self._limited(url, response)
        except TimeoutError as exc:
            raise FetchFailed(f"input_url {url}: timed out: {exc!r}") from exc
        except aiohttp.InvalidURL as exc:
            raise FetchFailed(f"refused: input_url is not usable: {exc}", permanent=True) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise FetchFailed(f"input_url {url}: {exc!r}") from exc

    async def _limited(self, url: str, response: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        received = 0
        while chunk := await response.content.read(READ_CHUNK_BYTES):
            received += len(chunk)
            if received > self._max_bytes:
                raise FetchFailed(self._too_large(url, received), permanent=True)
            yield chunk

    async def _checked(self, url: str) -> URL:
        """The URL through the guard, its host pinned to the addresses the guard checked."""
        try:
            target = await check_callback_url(url, self._allow, self._resolve, "input_url")
            parsed = URL(url, encoded=False)
        except CallbackUrlRejected as exc:
            raise FetchFailed(f"refused: {exc}", permanent=True) from exc
        except ResolutionUnavailable as exc:
            raise FetchFailed(f"input_url: {exc}") from exc
        except ValueError as exc:
            raise FetchFailed(f"refused: input_url is not usable: {exc}", permanent=True) from exc
        if parsed.raw_host:
            self._pins.pin(parsed.raw_host, target.addresses)
        return parsed

    def _check_answer(self, url: str, response: aiohttp.ClientResponse) -> None:
        status = response.status
        if status != 200:
            permanent = 300 <= status < 500 and status not in RETRYABLE_STATUSES
            why = "redirects are not followed" if 300 <= status < 400 else "expected 200"
            raise FetchFailed(f"input_url {url} answered {status} ({why})", permanent=permanent)
        declared = response.content_length
        if declared is not None and declared > self._max_bytes:
            raise FetchFailed(self._too_large(url, declared), permanent=True)

    def _too_large(self, url: str, size: int) -> str:
        return f"input_url {url} holds at least {size} bytes, over UPLOAD_MAX_BYTES ({self._max_bytes})"
