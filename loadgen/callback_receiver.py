"""A real local HTTP receiver for callbacks, verifying each with a Standard Webhooks library.

Used by the demo and the tests: it records every request (verified or not) and can be
told to answer the next requests with chosen statuses, to exercise delivery retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import uvicorn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STARTUP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReceivedCallback:
    webhook_id: str
    verified: bool
    event: dict[str, Any]
    received_monotonic_s: float
    received_wall_s: float


class CallbackReceiver:
    def __init__(self, secret: str, host: str = "127.0.0.1") -> None:
        self._verifier = Webhook(secret)
        self._host = host
        self.received: list[ReceivedCallback] = []
        self.requests_seen = 0
        # The most requests it was answering at once: what a sender's per-host bound allowed.
        self.max_concurrent = 0
        self._concurrent = 0
        self.scripted_statuses: deque[int] = deque()
        # Seconds to wait before answering: a slow receiver, for timeout tests.
        self.response_delay_s = 0.0
        self._arrived = asyncio.Condition()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/callbacks"

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        self.requests_seen += 1
        self._concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self._concurrent)
        try:
            if self.response_delay_s:
                await asyncio.sleep(self.response_delay_s)
        finally:
            self._concurrent -= 1
        if self.scripted_statuses:
            return Response(status_code=self.scripted_statuses.popleft())
        try:
            self._verifier.verify(body, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            verified = False
        record = ReceivedCallback(
            request.headers.get("webhook-id", ""), verified, json.loads(body), time.monotonic(), time.time()
        )
        async with self._arrived:
            self.received.append(record)
            self._arrived.notify_all()
        return Response(status_code=204 if verified else 401)

    async def start(self) -> None:
        app = Starlette(routes=[Route("/callbacks", self._receive, methods=["POST"])])
        config = uvicorn.Config(
            app, host=self._host, port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise TimeoutError(f"callback receiver did not start on {self._host}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, count: int, timeout_s: float) -> list[ReceivedCallback]:
        """The first `count` callbacks, or TimeoutError naming how many arrived."""
        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout_s)
            except TimeoutError:
                raise TimeoutError(
                    f"{len(self.received)} of {count} callbacks arrived within {timeout_s} s"
                ) from None
        return self.received[:count]
