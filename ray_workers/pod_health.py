"""A pod's liveness and readiness over HTTP, for the kubelet's probes.

The pod's process is Ray's driver; its replica runs in a Serve application. `/readyz`
answers 200 while that application is RUNNING (the model loaded, the consumer
started), `/livez` while it is not failed (DEPLOY_FAILED or UNHEALTHY: Serve gave up
restarting the replica, so the kubelet should restart the pod). Plain stdlib on a
thread: the driver has no event loop of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

FAILED = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})


class PodHealth:
    """Serves `/livez` and `/readyz` from `status()` (the Serve application's status)."""

    def __init__(self, host: str, port: int, status: Callable[[], str]) -> None:
        self._status = status
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = health.answer(self.path)
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: object) -> None:
                """Probes every few seconds: not worth a log line each."""

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pod-health", daemon=True)

    def answer(self, path: str) -> tuple[int, str]:
        try:
            status = self._status()
        except Exception as exc:  # the probe's boundary: any failure to read is "not ready"
            logger.warning("pod health: cannot read the application's status: %s", exc)
            status = "UNKNOWN"
        if path == "/readyz":
            return (200 if status == "RUNNING" else 503), status
        if path == "/livez":
            return (503 if status in FAILED else 200), status
        return 404, "not found"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
