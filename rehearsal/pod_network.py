"""Pods on a network of their own: one network namespace per pod, each with a veth into one
bridge, the way a CNI plugin wires pods on a node; Service names resolve through the
namespace's own /etc/hosts (`ip netns exec` mounts /etc/netns/NAME/hosts over it).

The bridge's subnet is 198.18.77.0/24, in the range RFC 2544 sets aside for benchmarks and
nothing routes: packets never leave this machine. The host side is 198.18.77.1, where what
the cluster gets from outside the overlay (the operator's broker) is reached.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = ipaddress.ip_network("198.18.77.0/24")
HOST_ADDRESS = "198.18.77.1"
NETNS_ETC = Path("/etc/netns")


class NetworkError(RuntimeError):
    """A namespace, link or address could not be made; the message names the command."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class PodNetwork:
    """The bridge and the pods' namespaces; `close` removes everything it made."""

    tag: str
    bridge: str = field(init=False)
    namespaces: dict[str, str] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    _next_host: int = 10

    def __post_init__(self) -> None:
        self.bridge = f"iqr{self.tag}"

    def open(self) -> None:
        if shutil.which("ip") is None:
            raise NetworkError(
                "the rehearsal needs `ip` (iproute2) and root for its pods' network namespaces"
            )
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{HOST_ADDRESS}/{SUBNET.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_pod(self, pod: str) -> str:
        """A namespace for `pod`, wired to the bridge; returns its address."""
        address = str(SUBNET.network_address + self._next_host)
        index = self._next_host
        self._next_host += 1
        namespace = f"iqr{self.tag}-{index}"
        host_end, pod_end = f"iqr{self.tag}h{index}", f"iqr{self.tag}p{index}"
        _ip("netns", "add", namespace)
        self.namespaces[pod] = namespace
        _ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        self.links.append(host_end)
        _ip("link", "set", pod_end, "netns", namespace)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", pod_end)
        _ip("-n", namespace, "link", "set", pod_end, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "route", "add", "default", "via", HOST_ADDRESS)
        return address

    def write_hosts(self, names: Mapping[str, str]) -> None:
        """Every namespace's /etc/hosts: localhost, and each name at its address."""
        lines = ["127.0.0.1 localhost", *(f"{address} {name}" for name, address in sorted(names.items()))]
        for namespace in self.namespaces.values():
            folder = NETNS_ETC / namespace
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def command(self, pod: str, argv: list[str]) -> list[str]:
        """`argv` run inside `pod`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[pod], *argv]

    def close(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
            shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        self.namespaces.clear()
        self.links.clear()
