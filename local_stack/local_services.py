"""Making sure RabbitMQ, its management API and Redis answer before the local stack starts.

`task up` and `task demo` start a local `rabbitmq-server` when nothing answers at
AMQP_URL and one is installed, enable `rabbitmq_management` when the autoscaler needs
it and it is off, and otherwise stop with a message saying how to get one. Redis (the job
records) is started the same way when it is missing; without it the stack runs on,
without job status, cancel, idempotency keys or waits, and says so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from urllib.parse import urlsplit

from broker.client import broker_urls, redact_url
from job_records.sentinel_url import is_sentinel_url

START_TIMEOUT_S = 60.0
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class BrokerNotAvailable(Exception):
    """No broker answers and none could be started; the message says what to do."""


# A Redis started here refuses writes past this instead of growing without bound.
REDIS_MAXMEMORY = "512mb"


def answers(url: str, default_port: int, timeout_s: float = 2.0) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout_s):
            return True
    except OSError:
        return False


def _start_locally(url: str, default_port: int, tool: str, arguments: list[str], how_else: str) -> None:
    """Run a local RabbitMQ tool to bring `url` up, then wait until it answers."""
    if answers(url, default_port):
        return
    path = shutil.which(tool)
    if urlsplit(url).hostname not in LOCAL_HOSTS or path is None:
        raise BrokerNotAvailable(f"nothing answers at {redact_url(url)}. {how_else}")
    print(f"nothing answers at {redact_url(url)}; running {tool} {' '.join(arguments)}", flush=True)
    subprocess.run([path, *arguments], check=False, capture_output=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(url, default_port):
        if time.monotonic() > deadline:
            raise BrokerNotAvailable(f"{redact_url(url)} did not answer within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def ensure_broker(amqp_url: str) -> None:
    """A node AMQP_URL names answers (the first is started here when none does and it is
    this machine's)."""
    urls = broker_urls(amqp_url)
    if any(answers(url, 5672) for url in urls[1:]):
        return
    _start_locally(
        urls[0],
        5672,
        "rabbitmq-server",
        ["-detached"],
        "Start RabbitMQ (Debian/Ubuntu: `apt-get install rabbitmq-server && rabbitmq-server -detached`; "
        "or `docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management`) or set AMQP_URL.",
    )


def ensure_management_api(management_url: str) -> None:
    """The autoscaler reads queue lengths from the management API, as KEDA's http protocol
    does (of several nodes, one answering is enough; the first is started if none does)."""
    urls = broker_urls(management_url)
    if any(answers(url, 15672) for url in urls[1:]):
        return
    _start_locally(
        urls[0],
        15672,
        "rabbitmq-plugins",
        ["enable", "rabbitmq_management"],
        "Enable it with `rabbitmq-plugins enable rabbitmq_management`, or set LOCAL_AUTOSCALER=0.",
    )


def ensure_redis(redis_url: str) -> bool:
    """Whether Redis answers at `redis_url`, starting a local `redis-server` if need be
    (never for sentinels: those are the operator's, and the records say if they are away)."""
    if is_sentinel_url(redis_url):
        return True
    try:
        _start_locally(
            redis_url,
            6379,
            "redis-server",
            [
                "--daemonize",
                "yes",
                "--port",
                str(urlsplit(redis_url).port or 6379),
                # Full, it refuses writes (the ingress answers 503) instead of growing until
                # the kernel kills it; records are never evicted behind the jobs' backs.
                *("--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction"),
            ],
            "Start Redis (Debian/Ubuntu: `apt-get install redis-server`) or set REDIS_URL.",
        )
    except BrokerNotAvailable as exc:
        print(
            f"{exc} Running without job records: no job status, cancel, Idempotency-Key or "
            "Prefer: wait, and a job run twice could end with two different terminal events.",
            flush=True,
        )
        return False
    return True
