"""Every message published on the broker's vhost while a block runs, by size.

RabbitMQ's firehose (tracing on the vhost) copies each published message to the
`amq.rabbitmq.trace` exchange; a queue bound there collects the copies, and the
management API reads them back with each one's `payload_bytes` (the payloads themselves
truncated). This is how `task demo` shows that a job by reference keeps every message
small: it is the broker's own count of what passed through it, not the publisher's.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx

from autoscaler.queue_metrics import management_nodes, management_url_from_amqp, vhost_from_amqp

TRACE_EXCHANGE = "amq.rabbitmq.trace"
READ_PAGE = 500


class TraceUnavailable(Exception):
    """The management API refused to turn tracing on or to hold the copies."""


@dataclass(frozen=True)
class TracedMessage:
    exchange: str
    routing_keys: tuple[str, ...]
    size: int


@contextlib.asynccontextmanager
async def traced_messages(amqp_url: str, management_url: str | None) -> AsyncIterator[list[TracedMessage]]:
    """The messages published while the block runs; the list fills when it ends."""
    node = management_nodes(management_url or management_url_from_amqp(amqp_url))[0]
    vhost = quote(vhost_from_amqp(amqp_url), safe="")
    queue = f"/api/queues/{vhost}/inferq-trace-{uuid.uuid4().hex[:12]}"
    traced: list[TracedMessage] = []
    async with httpx.AsyncClient(
        base_url=node.base_url, auth=(node.username, node.password), timeout=30
    ) as api:
        was_tracing = bool(_checked(await api.get(f"/api/vhosts/{vhost}")).json().get("tracing"))
        _checked(await api.put(queue, json={"durable": False, "arguments": {"x-expires": 600_000}}))
        binding = f"/api/bindings/{vhost}/e/{quote(TRACE_EXCHANGE)}/q/{queue.rsplit('/', 1)[1]}"
        _checked(await api.post(binding, json={"routing_key": "publish.#"}))
        try:
            if not was_tracing:
                _checked(await api.put(f"/api/vhosts/{vhost}", json={"tracing": True}))
            yield traced
        finally:
            if not was_tracing:
                _checked(await api.put(f"/api/vhosts/{vhost}", json={"tracing": False}))
            traced += await _drained(api, queue)
            await api.delete(queue)


async def _drained(api: httpx.AsyncClient, queue: str) -> list[TracedMessage]:
    drained: list[TracedMessage] = []
    while True:
        page = _checked(
            await api.post(
                f"{queue}/get",
                json={"count": READ_PAGE, "ackmode": "ack_requeue_false", "encoding": "auto", "truncate": 16},
            )
        ).json()
        for message in page:
            headers = message["properties"].get("headers", {})
            drained.append(
                TracedMessage(
                    headers.get("exchange_name", ""),
                    tuple(headers.get("routing_keys", ())),
                    int(message["payload_bytes"]),
                )
            )
        if len(page) < READ_PAGE:
            return drained


def _checked(answer: httpx.Response) -> httpx.Response:
    if answer.status_code >= 300:
        raise TraceUnavailable(f"{answer.request.method} {answer.request.url.path}: {answer.status_code}")
    return answer
