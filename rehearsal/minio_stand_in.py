#!/usr/bin/env python3
"""The kind overlay's MinIO, as the rehearsal runs it: no MinIO binary installs here, so
its container's command (`minio server DIR --address HOST:PORT ...`) runs moto's
S3-compatible server on the same address, answering MinIO's health endpoints as MinIO
does. Run by the pod's own Python (the staged image's), which sees the dependencies."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import Any

# Path-style addressing only, as the platform asks: a host such as minio.inferq.svc is not
# a bucket's name (moto reads it as one unless told; MinIO never does). Set before moto loads.
os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

HEALTH_PATHS = ("/minio/health/live", "/minio/health/ready")
Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def with_health(app: Wsgi) -> Wsgi:
    def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in HEALTH_PATHS:
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        return app(environ, start_response)

    return answer


def main() -> None:
    parser = argparse.ArgumentParser(prog="minio")
    parser.add_argument("command", choices=["server"])
    parser.add_argument("data")
    parser.add_argument("--address", default=":9000")
    parser.add_argument("--certs-dir")
    args = parser.parse_args()
    host, _, port = args.address.rpartition(":")
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(host or "0.0.0.0", int(port), with_health(app), threaded=True)


if __name__ == "__main__":
    main()
