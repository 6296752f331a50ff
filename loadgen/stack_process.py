"""The local stack as a child process, for the demo, the benchmarks and the tests.

Starts `python -m local_stack` with its output in a log file, waits until
it reports ready and the ingress answers /readyz, and stops it with SIGINT (the same
path as Ctrl-C on `task up`), killing it only if it does not stop in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from local_stack.launcher import READY_LINE

STACK_START_TIMEOUT_S = 240.0
INGRESS_START_TIMEOUT_S = 30.0
STACK_STOP_TIMEOUT_S = 90.0
START_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """The stack could not bind a port picked for it: another process took it first."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_ingress(env: Mapping[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m ingress` alone on a free port, with `env`, once its /readyz answers 200;
    returns the process (the caller terminates it) and its base URL."""
    port = free_port()
    ingress = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingress",
        env={**env, "INGRESS_PORT": str(port)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + INGRESS_START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=base_url) as client:
        while await _ready_status(client) != 200:
            if ingress.returncode is not None or time.monotonic() > deadline:
                ingress.terminate()
                await ingress.wait()
                raise RuntimeError(f"the ingress at {base_url} was not ready in {INGRESS_START_TIMEOUT_S} s")
            await asyncio.sleep(0.1)
    return ingress, base_url


class StackProcess:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._base_env = dict(env)
        self._pick_ports()
        self.log = Path(tempfile.mkstemp(prefix="inferq-stack-", suffix=".log")[1])
        self._process: asyncio.subprocess.Process | None = None

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.worker_metrics_port = free_port()
        self._env = {
            **self._base_env,
            "INGRESS_HOST": "127.0.0.1",
            "INGRESS_PORT": str(self.port),
            "AUTOSCALER_METRICS_PORT": str(self.metrics_port),
            "WORKER_METRICS_PORT": str(self.worker_metrics_port),
        }

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def start(self) -> float:
        """Start and wait until ready; returns the seconds it took. A port picked free can be
        taken before the stack binds it (Ray opens many): then it starts again on new ones."""
        for _ in range(START_ATTEMPTS - 1):
            try:
                return await self._start_once()
            except PortTaken:
                self._pick_ports()
        return await self._start_once()

    async def _start_once(self) -> float:
        started = time.monotonic()
        with self.log.open("wb") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "local_stack",
                env=self._env,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while READY_LINE not in self.output() or (await _ready_status(client)) != 200:
                if self._process.returncode is not None:
                    if "Address already in use" in self.output():
                        raise PortTaken(f"a port was taken before the stack bound it; see {self.log}")
                    raise RuntimeError(f"the stack exited with {self._process.returncode}; see {self.log}")
                if time.monotonic() - started > STACK_START_TIMEOUT_S:
                    raise TimeoutError(
                        f"the stack was not ready within {STACK_START_TIMEOUT_S:.0f} s; see {self.log}"
                    )
                await asyncio.sleep(0.2)
        return time.monotonic() - started

    async def wait_for_output(self, parts: list[str], timeout_s: float) -> bool:
        """Whether every one of `parts` shows up in the log within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not all(part in self.output() for part in parts):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def stop(self) -> int:
        """SIGINT, as Ctrl-C would; returns the exit code (killed: negative)."""
        process = self._process
        if process is None:
            return 0
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STACK_STOP_TIMEOUT_S)
            if process.returncode is None:
                process.kill()
        return await process.wait()


async def _ready_status(client: httpx.AsyncClient) -> int:
    try:
        return (await client.get("/readyz")).status_code
    except httpx.TransportError:
        return 0
