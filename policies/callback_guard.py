"""The callback-URL guard: callbacks may only reach public addresses.

A callback URL is caller-controlled, so without a guard it turns the platform into a
proxy into its own network (cloud metadata at 169.254.169.254, the broker, admin
ports). The ingress checks a URL when a job is submitted; the dispatcher checks again
at delivery time and connects only to an address it checked (the resolved address is
pinned), so DNS that changes in between (rebinding) cannot redirect the request.
Hosts or networks in the allow-list (`CALLBACK_ALLOW_HOSTS`) are exempt.

URLs are parsed the way the callback client (aiohttp, through yarl) will parse them, and
refused at submit when it could not send them as given: control characters or spaces, a
host that is not a valid DNS name (empty or over-long labels, `_`, an all-numeric last
label such as the legacy `2130706433`), a zone id, port 0. Unicode host names are sent
as their IDNA A-label. A lookup that fails for now (EAI_AGAIN, EAI_FAIL, EAI_MEMORY,
EAI_SYSTEM, a timeout) is `ResolutionUnavailable`, retryable; only a definite answer
(no such name) refuses a URL.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

MAX_URL_CHARS = 2048
# Parsing a URL and classifying an address are pure, and the dispatcher checks every
# delivery's URL: the same few come back thousands of times a second, so the last ones
# are kept (about 15 us a check otherwise). Host names are resolved on every check all
# the same (the resolver keeps answers for its own cache_s).
CHECKED_URLS_MAX = 1024
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# getaddrinfo errors that say "no such name": only these refuse a URL. Anything else
# (EAI_AGAIN, EAI_FAIL, EAI_MEMORY, EAI_SYSTEM such as EMFILE) says "not now".
_DEFINITE_DNS_ERRORS = frozenset(
    {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME), socket.EAI_SERVICE}
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class CallbackUrlRejected(ValueError):
    """The URL may not be called back; the message says why and names the value."""


class ResolutionUnavailable(Exception):
    """The host could not be resolved right now (a temporary DNS failure or a lookup past
    its deadline): retry later; nothing is known to be wrong with the URL."""


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


@functools.lru_cache(maxsize=CHECKED_URLS_MAX)
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


@functools.lru_cache(maxsize=CHECKED_URLS_MAX)
def parse_callback_url(url: str, field: str = "callback_url") -> tuple[str, str, int, str]:
    """Split a URL into (scheme, host, port, path-and-query) as the HTTP client will send
    it (host as an A-label, path percent-encoded), or say what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise CallbackUrlRejected(f"{field} is {len(url)} characters long; at most {MAX_URL_CHARS}")
    if _CONTROL_OR_SPACE.search(url):
        raise CallbackUrlRejected(f"{field} {url!r} contains a space or a control character")
    try:
        parsed = URL(url)
        port = parsed.port
        host = parsed.raw_host
    except (ValueError, UnicodeError) as exc:
        raise CallbackUrlRejected(f"{field} {url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise CallbackUrlRejected(f"{field} scheme {parsed.scheme!r} is not allowed; expected http or https")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise CallbackUrlRejected(f"{field} must not carry user information (user:pass@)")
    if not host:
        raise CallbackUrlRejected(f"{field} {url!r} has no host")
    if port is None or port == 0:
        raise CallbackUrlRejected(f"{field} {url!r} has port 0; expected 1-65535")
    _check_host(host.lower(), field)
    return parsed.scheme, host.lower(), port, parsed.raw_path_qs or "/"


def _check_host(host: str, field: str) -> None:
    if "%" in host:
        raise CallbackUrlRejected(f"{field} host {host!r} carries a zone id or an escape; not allowed")
    if _literal_address(host) is not None:
        return
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise CallbackUrlRejected(
            f"{field} host {host!r} is not a valid DNS name (labels of 1-63 letters, digits or "
            "hyphens, 253 characters in all)"
        )
    if labels[-1].isdigit():
        raise CallbackUrlRejected(
            f"{field} host {host!r} ends in an all-numeric label; write an IP address in dotted form"
        )


@functools.lru_cache(maxsize=CHECKED_URLS_MAX)
def _literal_address(host: str) -> IPAddress | None:
    """The address a host is written as (`127.0.0.1`, `::1`), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class SystemResolver:
    """getaddrinfo on threads of its own, with a deadline, and one lookup per name at a
    time however many requests ask for it: slow DNS answers 'try later' within the
    deadline and never holds the event loop's default executor.

    A lookup past its deadline still holds its thread until getaddrinfo returns, so a
    few requests a second naming slow random hosts could fill every thread and make
    each callback URL wait behind them. Two rules keep the pool for everyone else:
    answers are kept for `cache_s` (the hosts real callers use resolve from memory,
    whatever is queued), and a new lookup while `threads` are already taken answers
    'try later' at once instead of queueing."""

    def __init__(
        self, threads: int = 16, timeout_s: float = 3.0, cache_s: float = 30.0, cache_size: int = 4096
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dns")
        self._threads = threads
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._in_flight: dict[tuple[str, int], asyncio.Future[list[IPAddress]]] = {}
        self._answers: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        key = (host, port)
        loop = asyncio.get_running_loop()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        lookup = self._in_flight.get(key)
        if lookup is None:
            if len(self._in_flight) >= self._threads:
                raise ResolutionUnavailable(
                    f"callback_url host {host!r}: every DNS lookup thread is busy with slow names"
                )
            lookup = loop.run_in_executor(self._pool, _getaddrinfo, host, port)
            self._in_flight[key] = lookup
            lookup.add_done_callback(lambda done: self._settled(key, done))
        try:
            return await asyncio.wait_for(asyncio.shield(lookup), self._timeout_s)
        except TimeoutError:
            raise ResolutionUnavailable(
                f"callback_url host {host!r} did not resolve within {self._timeout_s:.0f} s"
            ) from None

    def _settled(self, key: tuple[str, int], lookup: asyncio.Future[list[IPAddress]]) -> None:
        self._in_flight.pop(key, None)
        if lookup.cancelled() or lookup.exception() is not None:
            return
        if len(self._answers) >= self._cache_size:
            self._answers.pop(next(iter(self._answers)))  # the oldest answer
        self._answers[key] = (asyncio.get_running_loop().time() + self._cache_s, lookup.result())

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _getaddrinfo(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _DEFINITE_DNS_ERRORS:
            raise CallbackUrlRejected(f"callback_url host {host!r} does not resolve: {exc}") from exc
        raise ResolutionUnavailable(f"callback_url host {host!r} cannot be resolved now: {exc}") from exc
    except UnicodeError as exc:
        raise CallbackUrlRejected(f"callback_url host {host!r} is not a valid DNS name: {exc}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


async def check_callback_url(
    url: str, allow: AllowList, resolve: Resolver, field: str = "callback_url"
) -> CallbackTarget:
    """Resolve the URL's host; every address must be public or allow-listed. `field` names
    the URL in what is refused (a job's `input_url` goes through the same guard)."""
    scheme, host, port, path = parse_callback_url(url, field)
    literal = _literal_address(host)
    addresses = [literal] if literal is not None else await resolve(host, port)
    if not addresses:
        raise CallbackUrlRejected(f"{field} host {host!r} resolved to no address")
    if not allow.allows_host(host):
        for address in addresses:
            reason = non_public_reason(address)
            if reason is not None and not allow.allows_address(address):
                raise CallbackUrlRejected(
                    f"{field} host {host!r} resolves to {address}, which is {reason}; "
                    "only public addresses or CALLBACK_ALLOW_HOSTS entries may be called back"
                )
    unique = tuple(dict.fromkeys(addresses))
    return CallbackTarget(scheme, host, port, path, unique)
