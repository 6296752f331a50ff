"""A message as it will be published, and where to: what the services hand the broker
client and `broker.settlement`, built without a connection in sight (job messages,
callback events)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OutgoingMessage:
    body: bytes
    message_id: str
    correlation_id: str | None = None
    priority: int | None = None
    headers: Mapping[str, Any] | None = None
    type: str | None = None
    # Per-message TTL; only ever set below a delay queue's own TTL (see retry_tiers).
    expiration_ms: int | None = None


@dataclass(frozen=True)
class Publish:
    """One message to publish: to `routing_key` on `exchange` ("" is the default exchange)."""

    message: OutgoingMessage
    routing_key: str
    exchange: str = ""
    # Set: may be combined with other deliveries' messages of the same key (see `settle`).
    combine_key: str | None = None
