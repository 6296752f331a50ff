"""`REDIS_URL=redis+sentinel://...`: the job records on a Redis that Sentinel keeps
available (a primary, its replicas, and sentinels that promote a replica when the primary
is lost). The URL names the sentinels, not a Redis: the clients ask them for the current
primary, and ask again after a failover.

    redis+sentinel://[:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/PRIMARY_NAME[/DB]

PORT defaults to 26379 (Sentinel's), DB to 0; an IPv6 host goes in brackets. The password
is both the Redis nodes' and the sentinels' (`requirepass` on each).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    primary_name: str
    db: int
    password: str | None


def is_sentinel_url(url: str) -> bool:
    return url.lower().startswith(f"{SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The sentinels, primary name, db and password of `url`; ValueError naming what is wrong."""
    if not is_sentinel_url(url):
        raise ValueError(f"not a {SCHEME}:// URL")
    rest = url[len(SCHEME) + 3 :]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) or None if at else None
    sentinels = tuple(_host_port(entry) for entry in hosts.split(",") if entry)
    if not sentinels:
        raise ValueError(f"{SCHEME}:// names no sentinel (HOST[:PORT][,HOST[:PORT]...])")
    segments = [segment for segment in path.split("/") if segment]
    if not segments or len(segments) > 2:
        raise ValueError(f"{SCHEME}:// needs /PRIMARY_NAME[/DB] after the sentinels")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"the database {segments[1]!r} is not a number")
    return SentinelUrl(
        sentinels, unquote(segments[0]), int(segments[1]) if len(segments) == 2 else 0, password
    )


def _host_port(entry: str) -> tuple[str, int]:
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = entry.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"sentinel {entry!r} is not HOST[:PORT]")
    return host, int(port) if port else DEFAULT_SENTINEL_PORT
