"""Making sure a RabbitMQ answers before the local stack starts.

`task up` and `task demo` start a local `rabbitmq-server` when nothing answers at
AMQP_URL and one is installed, and otherwise stop with a message saying how to get one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from urllib.parse import urlsplit

from contract.broker import redact_url

BROKER_START_TIMEOUT_S = 60.0


class BrokerNotAvailable(Exception):
    """No broker answers and none could be started; the message says what to do."""


def broker_answers(amqp_url: str, timeout_s: float = 2.0) -> bool:
    parts = urlsplit(amqp_url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout_s):
            return True
    except OSError:
        return False


def ensure_broker(amqp_url: str) -> None:
    if broker_answers(amqp_url):
        return
    host = urlsplit(amqp_url).hostname or ""
    server = shutil.which("rabbitmq-server")
    if host not in ("127.0.0.1", "localhost", "::1") or server is None:
        raise BrokerNotAvailable(
            f"RabbitMQ does not answer at {redact_url(amqp_url)}. Start one (Debian/Ubuntu: "
            "`apt-get install rabbitmq-server && rabbitmq-server -detached`; or "
            "`docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management`) or set AMQP_URL."
        )
    print(f"RabbitMQ is not running; starting it with {server} -detached", flush=True)
    subprocess.run([server, "-detached"], check=False)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while not broker_answers(amqp_url):
        if time.monotonic() > deadline:
            raise BrokerNotAvailable(f"rabbitmq-server did not answer within {BROKER_START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)


def management_api_answers(management_url: str, timeout_s: float = 2.0) -> bool:
    parts = urlsplit(management_url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 15672), timeout_s):
            return True
    except OSError:
        return False


def ensure_management_api(management_url: str) -> None:
    """The autoscaler reads queue lengths from the management API, as KEDA's http protocol does."""
    if management_api_answers(management_url):
        return
    host = urlsplit(management_url).hostname or ""
    plugins = shutil.which("rabbitmq-plugins")
    if host not in ("127.0.0.1", "localhost", "::1") or plugins is None:
        raise BrokerNotAvailable(
            f"RabbitMQ's management API does not answer at {redact_url(management_url)}; enable it with "
            "`rabbitmq-plugins enable rabbitmq_management`, or set LOCAL_AUTOSCALER=0 for fixed replicas."
        )
    print("enabling rabbitmq_management for the autoscaler", flush=True)
    subprocess.run([plugins, "enable", "rabbitmq_management"], check=False, capture_output=True)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while not management_api_answers(management_url):
        if time.monotonic() > deadline:
            raise BrokerNotAvailable(
                f"the management API did not answer within {BROKER_START_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.5)
