"""The one home of httpx: one signed POST of a callback event to a checked address.

Outcomes, never exceptions, come back to the dispatcher:

    DeliveryResult(delivered=True)                  2xx
    DeliveryResult(retryable=True, ...)             timeout, connection error, 5xx, 429, 3xx
    DeliveryResult(retryable=False, ...)            410 Gone, other 4xx, URL refused by the guard

The request goes to the address the guard checked (pinned), with the original Host
header and TLS server name, so a DNS answer that changes after the check cannot send
it anywhere else. Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

import httpx
import msgspec

from contract.callback_guard import (
    AllowList,
    CallbackUrlRejected,
    Resolver,
    check_callback_url,
    resolve_with_system_dns,
)
from contract.envelope import CallbackDelivery
from ray_workers.signing import WebhookSigner

USER_AGENT = "inferq-callbacks/1"


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    retryable: bool = False
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


class CallbackClient:
    def __init__(
        self,
        signer: WebhookSigner,
        allow: AllowList,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        resolve: Resolver = resolve_with_system_dns,
    ) -> None:
        self._signer = signer
        self._allow = allow
        self._resolve = resolve
        self._client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            transport=transport,
            trust_env=False,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def deliver(self, delivery: CallbackDelivery) -> DeliveryResult:
        try:
            target = await check_callback_url(delivery.callback_url, self._allow, self._resolve)
        except CallbackUrlRejected as exc:
            return DeliveryResult(delivered=False, retryable=False, error=f"refused: {exc}")
        body = msgspec.json.encode(delivery.event)
        default_port = 443 if target.scheme == "https" else 80
        host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
        headers = {
            **self._signer.headers(delivery.webhook_id, int(time.time()), body),
            "content-type": "application/json",
            "host": host_header,
            "user-agent": USER_AGENT,
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        failure = DeliveryResult(delivered=False, retryable=True, error="no address to connect to")
        # Only checked addresses are tried, in resolver order, moving on when one refuses.
        for address in target.addresses:
            literal = f"[{address}]" if isinstance(address, ipaddress.IPv6Address) else str(address)
            pinned_url = f"{target.scheme}://{literal}:{target.port}{target.path_and_query}"
            try:
                response = await self._client.post(
                    pinned_url, content=body, headers=headers, extensions=extensions
                )
            except httpx.ConnectError as exc:
                failure = DeliveryResult(delivered=False, retryable=True, error=f"transport: {exc!r}")
                continue
            except httpx.TimeoutException as exc:
                return DeliveryResult(delivered=False, retryable=True, error=f"timeout: {exc!r}")
            except httpx.HTTPError as exc:
                return DeliveryResult(delivered=False, retryable=True, error=f"transport: {exc!r}")
            return _classify(response)
        return failure


def _classify(response: httpx.Response) -> DeliveryResult:
    status = response.status_code
    if 200 <= status < 300:
        return DeliveryResult(delivered=True, status=status)
    retryable = status >= 500 or status == 429 or 300 <= status < 400 or status == 408
    return DeliveryResult(
        delivered=False,
        retryable=retryable,
        status=status,
        error=f"receiver answered {status}",
        retry_after_s=_retry_after_s(response.headers.get("retry-after")),
    )


def _retry_after_s(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
