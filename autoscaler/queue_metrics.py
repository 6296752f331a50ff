"""Queue length the way KEDA's rabbitmq scaler reads it with `protocol: http`.

The management API's `messages` is ready + unacknowledged, so jobs a worker has taken
but not yet acked count as load and a busy replica is never seen as idle. (Over AMQP a
passive declare sees only ready messages.) The API refreshes its figures every
`collect_statistics_interval` (5 s by default), which adds to detection latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import httpx

from broker.client import broker_urls, redact_url

MANAGEMENT_PORT = 15672


class QueueMetricUnavailable(Exception):
    """The management API could not be read; the autoscaler treats it as a failed read."""


def management_url_from_amqp(amqp_url: str) -> str:
    """`amqp://u:p@host:5672/vhost` -> `http://u:p@host:15672` (the same credentials), for
    each node AMQP_URL lists (comma-separated, as it is). Nodes whose management API
    listens elsewhere (several nodes on one machine) are named by RABBITMQ_MANAGEMENT_URL."""
    urls = []
    for url in broker_urls(amqp_url):
        parts = urlsplit(url)
        userinfo = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
        urls.append(f"http://{userinfo}@{parts.hostname or '127.0.0.1'}:{MANAGEMENT_PORT}")
    return ",".join(urls)


def vhost_from_amqp(amqp_url: str) -> str:
    path = urlsplit(broker_urls(amqp_url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


@dataclass(frozen=True)
class ManagementNode:
    """One node's management API: where it listens, its credentials, and how to name it
    in a message (password redacted)."""

    base_url: str
    username: str
    password: str = field(repr=False)
    shown: str


def management_nodes(base_url: str) -> list[ManagementNode]:
    """Each node of RABBITMQ_MANAGEMENT_URL (comma-separated), guest/guest when unnamed."""
    nodes = []
    for url in broker_urls(base_url):
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.hostname}:{parts.port or MANAGEMENT_PORT}"
        nodes.append(
            ManagementNode(base, parts.username or "guest", parts.password or "guest", redact_url(url))
        )
    return nodes


class ManagementApi:
    """The management API of one node, or of a cluster's nodes (comma-separated URLs):
    a read goes to the node that answered last and moves on to the others when it
    fails, so one node's death does not blind the autoscaler."""

    def __init__(self, base_url: str, vhost: str, timeout_s: float = 5.0) -> None:
        self._vhost = vhost
        self._nodes: list[tuple[str, httpx.AsyncClient]] = [
            (
                node.shown,
                httpx.AsyncClient(
                    base_url=node.base_url,
                    auth=(node.username, node.password),
                    timeout=timeout_s,
                    trust_env=False,
                ),
            )
            for node in management_nodes(base_url)
        ]
        self._current = 0

    async def close(self) -> None:
        for _display, client in self._nodes:
            await client.aclose()

    async def queue_messages(self, queue: str) -> float:
        """Ready + unacked messages of `queue`."""
        path = f"/api/queues/{quote(self._vhost, safe='')}/{quote(queue, safe='')}"
        failures = []
        for step in range(len(self._nodes)):
            index = (self._current + step) % len(self._nodes)
            display, client = self._nodes[index]
            try:
                response = await client.get(path)
                response.raise_for_status()
                messages = float(response.json().get("messages", 0) or 0)
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"{display}: {exc!r}")
                continue
            self._current = index
            return messages
        raise QueueMetricUnavailable(f"cannot read {queue}: {'; '.join(failures)}")
