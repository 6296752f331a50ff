"""Making sure RabbitMQ, its management API, Redis and an object store answer before the
local stack starts.

`task up` and `task demo` start a local `rabbitmq-server` when nothing answers at
AMQP_URL and one is installed, enable `rabbitmq_management` when the autoscaler needs
it and it is off, and otherwise stop with a message saying how to get one. Redis (the job
records) is started the same way when it is missing; without it the stack runs on,
without job status, cancel, idempotency keys or waits, and says so. With S3_ENDPOINT_URL
unset, uploads go to a local S3-compatible server (moto's, from the dev dependencies),
started the same way; without one, uploads are off.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from broker.client import broker_urls, redact_url
from job_records.sentinel_url import is_sentinel_url
from object_store.store import ObjectStore, StoreSettings, StoreUnavailable

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


# The local object store: moto's S3-compatible server, which takes any key pair.
LOCAL_STORE_URL = "http://127.0.0.1:9000"
LOCAL_STORE_KEYS = {"S3_ACCESS_KEY_ID": "inferq-local", "S3_SECRET_ACCESS_KEY": "inferq-local-secret"}


def start_moto_server(host: str, port: int) -> subprocess.Popen[bytes]:
    """moto's S3-compatible server, in a session of its own (it outlives the caller)."""
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    return subprocess.Popen(
        [server, "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_until_answers(url: str, default_port: int, timeout_s: float = START_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not answers(url, default_port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def ensure_object_store(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that point the stack at an object store: none when S3_ENDPOINT_URL
    is set (the operator's store); otherwise a local server at LOCAL_STORE_URL, started
    when nothing answers there, with its bucket made. Empty when none could be started:
    uploads are then off, and the stack says so."""
    if env.get("S3_ENDPOINT_URL"):
        return {}
    if not answers(LOCAL_STORE_URL, 9000):
        try:
            start_moto_server("127.0.0.1", 9000)
        except OSError as exc:
            print(f"uploads are off: no local object store ({exc}); set S3_ENDPOINT_URL", flush=True)
            return {}
        if not wait_until_answers(LOCAL_STORE_URL, 9000):
            print(f"uploads are off: nothing answered at {LOCAL_STORE_URL}; set S3_ENDPOINT_URL", flush=True)
            return {}
    local = {"S3_ENDPOINT_URL": LOCAL_STORE_URL, **LOCAL_STORE_KEYS}
    settings = StoreSettings(
        LOCAL_STORE_URL,
        env.get("S3_BUCKET") or "inferq",
        access_key_id=local["S3_ACCESS_KEY_ID"],
        secret_access_key=local["S3_SECRET_ACCESS_KEY"],
    )
    try:
        asyncio.run(make_bucket(settings))
    except StoreUnavailable as exc:
        print(f"uploads are off: the local object store refused its bucket: {exc}", flush=True)
        return {}
    print(f"uploads: a local S3-compatible store (moto) at {LOCAL_STORE_URL}", flush=True)
    return local


async def make_bucket(settings: StoreSettings) -> None:
    async with ObjectStore(settings) as store:
        await store.ensure_bucket()
