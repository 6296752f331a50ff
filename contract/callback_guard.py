"""The callback-URL guard: callbacks may only reach public addresses.

A callback URL is caller-controlled, so without a guard it turns the platform into a
proxy into its own network (cloud metadata at 169.254.169.254, the broker, admin
ports). The ingress checks a URL when a job is submitted; the dispatcher checks again
at delivery time and connects only to an address it checked (the resolved address is
pinned), so DNS that changes in between (rebinding) cannot redirect the request.
Hosts or networks in the allow-list (`CALLBACK_ALLOW_HOSTS`) are exempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class CallbackUrlRejected(ValueError):
    """The URL may not be called back; the message says why and names the value."""


@dataclass(frozen=True)
class CallbackTarget:
    """A checked URL and the addresses it may be delivered to."""

    scheme: str
    host: str
    port: int
    path_and_query: str
    addresses: tuple[IPAddress, ...]


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def non_public_reason(address: IPAddress) -> str | None:
    """Why an address is not a public unicast address, or None when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = non_public_reason(embedded)
            return f"embeds IPv4 {embedded} ({inner})" if inner else None
    checks: tuple[tuple[bool, str], ...] = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local (includes cloud metadata)"),
        (address.is_multicast, "multicast"),
        (isinstance(address, ipaddress.IPv4Address) and address in _CGNAT, "carrier-grade NAT"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
        (not address.is_global, "not globally routable"),
    )
    return next((reason for failed, reason in checks if failed), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def parse_callback_url(url: str) -> tuple[str, str, int, str]:
    """Split a URL into (scheme, host, port, path-and-query), or say what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackUrlRejected(f"callback_url {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise CallbackUrlRejected(
            f"callback_url scheme {parts.scheme!r} is not allowed; expected http or https"
        )
    if parts.username is not None or parts.password is not None:
        raise CallbackUrlRejected("callback_url must not carry user information (user:pass@)")
    if not parts.hostname:
        raise CallbackUrlRejected(f"callback_url {url!r} has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname.lower(), port or default_port, path


async def resolve_with_system_dns(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CallbackUrlRejected(f"callback_url host {host!r} does not resolve: {exc}") from exc
    return [ipaddress.ip_address(info[4][0]) for info in infos]


async def check_callback_url(
    url: str, allow: AllowList, resolve: Resolver = resolve_with_system_dns
) -> CallbackTarget:
    """Resolve the URL's host; every address must be public or allow-listed."""
    scheme, host, port, path = parse_callback_url(url)
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        addresses = await resolve(host, port)
    if not addresses:
        raise CallbackUrlRejected(f"callback_url host {host!r} resolved to no address")
    if not allow.allows_host(host):
        for address in addresses:
            reason = non_public_reason(address)
            if reason is not None and not allow.allows_address(address):
                raise CallbackUrlRejected(
                    f"callback_url host {host!r} resolves to {address}, which is {reason}; "
                    "only public addresses or CALLBACK_ALLOW_HOSTS entries may be called back"
                )
    unique = tuple(dict.fromkeys(addresses))
    return CallbackTarget(scheme, host, port, path, unique)
