"""A callback receiver in a process of its own, for measuring the user's path.

A user's webhook endpoint does not share a process with the platform, so the
benchmarks run theirs apart too: `python -m loadgen.receiver_process` serves POST
/callbacks (aiohttp), verifies each request with a Standard Webhooks library (or, with
no secret, answers 204 at once: a no-op receiver for dispatch capacity), optionally
waits before answering (a slow host), and records what arrived. GET /received?since=N
returns the records from the N-th on, so the parent reads them without sharing memory.

`ReceiverProcess` starts and stops it from the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

READY_PREFIX = "receiver listening on port "
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ReceivedRecord:
    webhook_id: str
    status: str
    job_id: str
    received_wall_s: float
    verified: bool
    batch_size: int
    inference_ms: float
    # Submitted to taken by the worker (the event's timings.queued_ms).
    queued_ms: float = 0.0
    # When the worker decided the job's outcome (the event's `timestamp`), wall seconds.
    outcome_wall_s: float = 0.0


class _Recorder:
    def __init__(self, secret: str | None, delay_s: float) -> None:
        self._verifier = Webhook(secret) if secret else None
        self._delay_s = delay_s
        self.records: list[list[Any]] = []
        self.requests = 0

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        if self._verifier is None:
            self.records.append(
                [request.headers.get("webhook-id", ""), "", "", time.time(), False, 0, 0.0, 0.0, 0.0]
            )
            return web.Response(status=204)
        try:
            # Verified, the library hands back the body parsed: it is not parsed twice.
            event, verified = self._verifier.verify(body, dict(request.headers)), True
        except WebhookVerificationError:
            event, verified = json.loads(body), False
        data = event["data"]
        timings = data.get("timings", {})
        self.records.append(
            [
                request.headers.get("webhook-id", ""),
                data["status"],
                data["id"],
                time.time(),
                verified,
                timings.get("batch_size", 0),
                timings.get("inference_ms", 0.0),
                timings.get("queued_ms", 0.0),
                datetime.fromisoformat(event["timestamp"]).timestamp(),
            ]
        )
        return web.Response(status=204 if verified else 401)

    async def received(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return web.json_response({"requests": self.requests, "records": self.records[since:]})


async def _serve(host: str, port: int, secret: str | None, delay_s: float) -> None:
    recorder = _Recorder(secret, delay_s)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/callbacks", recorder.receive)
    app.router.add_get("/received", recorder.received)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = port or runner.addresses[0][1]
    print(f"{READY_PREFIX}{bound}", flush=True)
    try:
        await asyncio.Event().wait()  # until the parent terminates the process
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="receiver_process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", help="whsec_... to verify with; without it, a no-op receiver")
    parser.add_argument("--delay-s", type=float, default=0.0, help="wait before answering")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args.host, args.port, args.secret, args.delay_s))
    return 0


class ReceiverProcess:
    """Starts `python -m loadgen.receiver_process` and reads back what it received."""

    def __init__(
        self, secret: str | None, host: str = "127.0.0.1", delay_s: float = 0.0, port: int = 0
    ) -> None:
        self._args = ["--host", host, "--port", str(port), "--delay-s", str(delay_s)]
        self._args += ["--secret", secret] if secret else []
        self._host = host
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0
        self.records: list[ReceivedRecord] = []

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/callbacks"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadgen.receiver_process", *self._args, stdout=asyncio.subprocess.PIPE
        )
        if self._process.stdout is None:
            raise RuntimeError("receiver started without a stdout pipe")
        line = await asyncio.wait_for(self._process.stdout.readline(), START_TIMEOUT_S)
        if not line.decode().startswith(READY_PREFIX):
            raise RuntimeError(f"receiver did not start: {line!r}")
        self.port = int(line.decode().removeprefix(READY_PREFIX))
        self._session = aiohttp.ClientSession()

    async def refresh(self) -> list[ReceivedRecord]:
        """Fetch the records that arrived since the last refresh; returns all so far."""
        if self._session is None:
            raise RuntimeError("receiver not started")
        url = f"http://{self._host}:{self.port}/received?since={len(self.records)}"
        async with self._session.get(url) as response:
            payload = await response.json()
        self.records.extend(ReceivedRecord(*row) for row in payload["records"])
        return self.records

    async def wait_for(self, job_ids: set[str], timeout_s: float, poll_s: float = 0.05) -> bool:
        """Whether a callback for every id arrived within `timeout_s` (webhook ids for a no-op
        receiver, which does not parse bodies)."""
        deadline = time.monotonic() + timeout_s
        missing, checked = set(job_ids), 0
        while True:
            # Only the records new since the last poll: a whole bench run's records, scanned
            # every 50 ms, cost the measuring process 0.4 ms of CPU a job on the measured box.
            records = await self.refresh()
            missing.difference_update(r.job_id or r.webhook_id for r in records[checked:])
            checked = len(records)
            if not missing:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(poll_s)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


if __name__ == "__main__":
    sys.exit(main())
