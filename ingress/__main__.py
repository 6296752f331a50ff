"""`python -m ingress`: serve the ingress with uvicorn, settings from the environment."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn

from ingress.app import create_app
from ingress.settings import IngressSettings
from policies.heap_collection import settle_startup_heap
from settings.environment import ConfigError


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = IngressSettings.from_env(os.environ)
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    settle_startup_heap()  # what is loaded by now lives as long as the process
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT before the lifespan closes the broker.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
        limit_concurrency=settings.max_connections,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
