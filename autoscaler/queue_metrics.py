"""Queue length the way KEDA's rabbitmq scaler reads it with `protocol: http`.

The management API's `messages` is ready + unacknowledged, so jobs a worker has taken
but not yet acked count as load and a busy replica is never seen as idle. (Over AMQP a
passive declare sees only ready messages.) The API refreshes its figures every
`collect_statistics_interval` (5 s by default), which adds to detection latency.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

import httpx

from contract.broker import broker_urls, redact_url

MANAGEMENT_PORT = 15672


class QueueMetricUnavailable(Exception):
    """The management API could not be read; the autoscaler treats it as a failed read."""


def management_url_from_amqp(amqp_url: str) -> str:
    """`amqp://u:p@host:5672/vhost` -> `http://u:p@host:15672` (the same credentials); of
    a list of nodes, the first's (RABBITMQ_MANAGEMENT_URL names another)."""
    parts = urlsplit(broker_urls(amqp_url)[0])
    userinfo = f"{parts.username or 'guest'}:{parts.password or 'guest'}"
    return f"http://{userinfo}@{parts.hostname or '127.0.0.1'}:{MANAGEMENT_PORT}"


def vhost_from_amqp(amqp_url: str) -> str:
    path = urlsplit(broker_urls(amqp_url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class ManagementApi:
    def __init__(self, base_url: str, vhost: str, timeout_s: float = 5.0) -> None:
        parts = urlsplit(base_url)
        self._display_url = redact_url(base_url)
        self._vhost = vhost
        self._client = httpx.AsyncClient(
            base_url=f"{parts.scheme}://{parts.hostname}:{parts.port or MANAGEMENT_PORT}",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=timeout_s,
            trust_env=False,
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def queue_messages(self, queue: str) -> float:
        """Ready + unacked messages of `queue`."""
        path = f"/api/queues/{quote(self._vhost, safe='')}/{quote(queue, safe='')}"
        try:
            response = await self._client.get(path)
            response.raise_for_status()
            return float(response.json().get("messages", 0) or 0)
        except (httpx.HTTPError, ValueError) as exc:
            raise QueueMetricUnavailable(f"cannot read {queue} from {self._display_url}: {exc!r}") from exc
