"""A three-node RabbitMQ cluster on this one machine, beside the broker already running.

`task ha:up` / `task ha:down` (`python -m local_stack.ha_cluster up|down|status`) start
and stop three extra `rabbitmq-server` nodes, `rabbit-ha1@localhost` to
`rabbit-ha3@localhost`, AMQP on 5701-5703 and the management API on 15701-15703, and
join the second and third to the first with `rabbitmqctl join_cluster`. Each node has
its own distribution port (RABBITMQ_DIST_PORT), config file (the system one pins the
listener to 5672; the management listener gets a port of its own, as 15672 is the
standalone broker's), advanced config (ADVANCED_CONFIG: the dead-letter confirm timeout
the cluster runs with), plugins file (the management plugin: the local autoscaler reads
queue depths through it), Mnesia and log directories and pid file, all under HA_BASE,
owned by the `rabbitmq` user, which the nodes run as. `up` prints the AMQP_URL and the
RABBITMQ_MANAGEMENT_URL that name every node.

The broker on 5672 is never joined, stopped or reset: every `rabbitmqctl` call here
names one of these nodes with `-n`. `down` stops the nodes it started and removes
their directories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HA_BASE = Path("/var/lib/rabbitmq/inferq-ha")
START_TIMEOUT_S = 90
RABBITMQ_USER = "rabbitmq"


# RabbitMQ 3.10: a quorum queue's at-least-once dead-letter worker that starts while its
# target queue is still electing a leader sends to the dead one, and holds what it sent
# until this confirm timeout (default 180 s) lapses, then resends. On a node's death that
# is every retry leaving its delay tier meanwhile (measured on 24 tiers: 833 held while the
# node stayed away; with the default, 453 still held 240 s after it came back, with 10 s,
# none 6 s after). The cluster's RabbitmqCluster sets the same (cluster/base/rabbitmq.yaml).
ADVANCED_CONFIG = "[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 10000}]}].\n"


class ClusterError(Exception):
    """A node did not start, join or stop; the message says which and why."""


@dataclass(frozen=True)
class HaNode:
    name: str
    amqp_port: int
    dist_port: int
    management_port: int

    @property
    def node(self) -> str:
        return f"{self.name}@localhost"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}"

    @property
    def directory(self) -> Path:
        return HA_BASE / self.name

    @property
    def pid_file(self) -> Path:
        return self.directory / "rabbitmq.pid"


NODES = (
    HaNode("rabbit-ha1", 5701, 25701, 15701),
    HaNode("rabbit-ha2", 5702, 25702, 15702),
    HaNode("rabbit-ha3", 5703, 25703, 15703),
)


def rabbitmqctl(node: HaNode, *args: str, timeout_s: float = 60) -> str:
    """`rabbitmqctl -n NODE ...`, always naming one of these nodes; ClusterError on failure."""
    try:
        result = subprocess.run(
            ["rabbitmqctl", "-n", node.node, *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(
            f"rabbitmqctl -n {node.node} {' '.join(args)}: no answer in {timeout_s} s"
        ) from exc
    if result.returncode != 0:
        raise ClusterError(
            f"rabbitmqctl -n {node.node} {' '.join(args)} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    return result.stdout


def _prepare(node: HaNode) -> dict[str, str]:
    """The node's own files, owned by the rabbitmq user; returns its environment."""
    directory = node.directory
    (directory / "mnesia").mkdir(parents=True, exist_ok=True)
    (directory / "log").mkdir(parents=True, exist_ok=True)
    (directory / "rabbitmq.conf").write_text(
        f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}\n"
        f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {node.management_port}\n"
    )
    (directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
    (directory / "advanced.config").write_text(ADVANCED_CONFIG)
    shutil.chown(HA_BASE, RABBITMQ_USER, RABBITMQ_USER)
    for path in [directory, *directory.rglob("*")]:
        shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)
    return {
        "RABBITMQ_NODENAME": node.node,
        "RABBITMQ_NODE_PORT": str(node.amqp_port),
        "RABBITMQ_DIST_PORT": str(node.dist_port),
        "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(node.pid_file),
    }


def start_node(node: HaNode) -> None:
    env = _prepare(node)
    command = ["runuser", "-u", RABBITMQ_USER, "--", "env", *(f"{k}={v}" for k, v in env.items())]
    command += ["rabbitmq-server", "-detached"]
    started = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if started.returncode != 0:
        raise ClusterError(f"{node.node} did not start: {(started.stderr or started.stdout).strip()[-500:]}")
    # -detached returns before the node registers with epmd: wait for it to answer at all.
    deadline = time.monotonic() + START_TIMEOUT_S
    while not is_running(node):
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{node.node} did not answer within {START_TIMEOUT_S} s; see {node.directory}/log"
            )
        time.sleep(0.5)
    rabbitmqctl(node, "--timeout", str(START_TIMEOUT_S), "await_startup", timeout_s=START_TIMEOUT_S + 10)


def kill(node: HaNode) -> None:
    """`kill -9` of the node: no goodbye to its peers or its clients (the chaos tests)."""
    os.kill(int(node.pid_file.read_text().strip()), signal.SIGKILL)


def is_running(node: HaNode) -> bool:
    try:
        rabbitmqctl(node, "ping", timeout_s=15)
    except ClusterError:
        return False
    return True


def up(nodes: Sequence[HaNode] = NODES) -> None:
    """Start the nodes that are not running and join them to the first. With none of
    them running, their directories are left over from a run stopped before its `down`
    (a test session killed, say) and are removed first: a node started on its old Mnesia
    waits for the peers it last saw, and they were stopped before it."""
    running = [is_running(node) for node in nodes]
    if not any(running):
        for node in nodes:
            shutil.rmtree(node.directory, ignore_errors=True)
    first = nodes[0]
    if not running[0]:
        start_node(first)
    for node, was_running in zip(nodes[1:], running[1:], strict=True):
        if was_running:
            continue
        start_node(node)
        rabbitmqctl(node, "stop_app")
        rabbitmqctl(node, "join_cluster", first.node)
        rabbitmqctl(node, "start_app")


def down(nodes: Sequence[HaNode] = NODES) -> None:
    """Stop every node of this cluster that runs, then remove their directories: only
    theirs, so a node someone else keeps under HA_BASE keeps its files (and its pid file,
    the only way to stop it cleanly)."""
    for node in reversed(nodes):
        if is_running(node):
            pid_file = [str(node.pid_file)] if node.pid_file.exists() else []
            rabbitmqctl(node, "stop", *pid_file, timeout_s=90)
    for node in nodes:
        shutil.rmtree(node.directory, ignore_errors=True)


def queue_leaders(node: HaNode) -> dict[str, str]:
    """Each quorum queue's leading node, as `node` sees them (queue name -> node name)."""
    rows = json.loads(rabbitmqctl(node, "list_queues", "name", "leader", "--formatter", "json"))
    return {row["name"]: str(row["leader"]) for row in rows if row.get("leader")}


# Per quorum queue, from its leader's Raft state: what `list_queues` cannot show, the
# messages waiting to be dead-lettered at-least-once (discarded) and those in flight to
# their target (discard_checked_out).
_RAFT_COUNTS = """
[{element(4, amqqueue:get_name(Q)),
  case catch ra:leader_query(amqqueue:get_pid(Q), fun rabbit_fifo:overview/1) of
      {ok, {_, O}, {_, Leader}} ->
          {Leader, maps:with([num_ready_messages, num_checked_out, num_consumers,
                              num_discarded, num_discard_checked_out], O)};
      Other -> Other
  end}
 || Q <- rabbit_amqqueue:list(), amqqueue:get_type(Q) =:= rabbit_quorum_queue,
    string:prefix(element(4, amqqueue:get_name(Q)), <<"%s">>) =/= nomatch].
"""


def raft_counts(node: HaNode, prefix: str) -> str:
    """Each quorum queue named `prefix...`: its leader and message counts (ready, checked
    out, consumers, waiting for and in at-least-once dead-lettering), as Erlang terms."""
    return rabbitmqctl(node, "eval", _RAFT_COUNTS % prefix)


def running_nodes(node: HaNode) -> list[str]:
    """The cluster's running nodes, as `node` sees them."""
    status = rabbitmqctl(node, "cluster_status", "--formatter", "json")
    running: list[str] = json.loads(status).get("running_nodes", [])
    return running


def wait_until_running(nodes: Sequence[HaNode], timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    expected = {node.node for node in nodes}
    while True:
        try:
            if set(running_nodes(nodes[0])) >= expected:
                return
        except ClusterError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"the cluster did not show {sorted(expected)} running within {timeout_s} s")
        time.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ha_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("ha_cluster: run as root (the nodes run as the rabbitmq user)", file=sys.stderr)
        return 2
    try:
        if args.command == "up":
            up()
            wait_until_running(NODES)
            print("running: " + ", ".join(f"{n.node} (AMQP {n.amqp_port})" for n in NODES))
            print("AMQP_URL=" + ",".join(n.amqp_url for n in NODES))
            print("RABBITMQ_MANAGEMENT_URL=" + ",".join(n.management_url for n in NODES))
        elif args.command == "down":
            down()
            print("stopped and removed: " + ", ".join(n.node for n in NODES))
        else:
            for node in NODES:
                print(f"{node.node}: {'running' if is_running(node) else 'stopped'}")
    except ClusterError as exc:
        print(f"ha_cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
