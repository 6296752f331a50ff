"""The job records on a Redis that Sentinel keeps available (`REDIS_URL=redis+sentinel://`).

A primary, a replica and three sentinels run here as real `redis-server` processes on
loopback ports of their own (never the machine's Redis on 6379). The primary is killed:
the sentinels promote the replica, and the same store, unchanged, reads the record it
wrote before and writes again, on the new primary.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from job_records.sentinel_url import parse_sentinel_url
from job_records.store import JobRecords, RecordsUnavailable
from loadgen.stack_process import free_port
from settings.environment import ConfigError, Environment
from tests.conftest import wait_until
from wire.envelope import Job

PASSWORD = "sentinel-test-password"
PRIMARY_NAME = "inferq-test"


@dataclass
class SentinelRedis:
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    processes: dict[str, subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{PRIMARY_NAME}/0"

    def ask(self, port: int, *command: str) -> str:
        done = subprocess.run(
            ["redis-cli", "--no-auth-warning", "-a", PASSWORD, "-p", str(port), *command],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout.strip()

    def primary(self) -> str:
        return self.ask(self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", PRIMARY_NAME)


def _redis(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    folder.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
    argv += ["--requirepass", PASSWORD, "--masterauth", PASSWORD, "--save", "", "--appendonly", "no"]
    return subprocess.Popen([*argv, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _sentinel(folder: Path, port: int, primary_port: int) -> subprocess.Popen[bytes]:
    folder.mkdir()
    config = folder / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\nrequirepass {PASSWORD}\n"
        f"sentinel sentinel-pass {PASSWORD}\n"
        f"sentinel monitor {PRIMARY_NAME} 127.0.0.1 {primary_port} 2\n"
        f"sentinel auth-pass {PRIMARY_NAME} {PASSWORD}\n"
        f"sentinel down-after-milliseconds {PRIMARY_NAME} 1000\n"
        # A failed election is tried again after twice this: 8 s, where 10 s made the
        # second try (20 s) and a busy machine overrun the promotion's bound once in CI.
        f"sentinel failover-timeout {PRIMARY_NAME} 4000\n"
    )
    return subprocess.Popen(
        ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    primary, replica = free_port(), free_port()
    sentinels = [free_port() for _ in range(3)]
    processes = {"primary": _redis(tmp_path / "primary", primary)}
    processes["replica"] = _redis(tmp_path / "replica", replica, "--replicaof", "127.0.0.1", str(primary))
    for n, port in enumerate(sentinels):
        processes[f"sentinel-{n}"] = _sentinel(tmp_path / f"sentinel-{n}", port, primary)
    setup = SentinelRedis(primary, replica, sentinels, processes)
    try:
        yield setup
    finally:
        for process in processes.values():
            process.kill()
            process.wait(10)


def _job() -> Job:
    return Job(
        id=str(uuid.uuid4()), model="echo", input=1, callback_url=None, submitted_at_ms=1_000, owner="o"
    )


async def test_given_the_primary_killed_then_the_store_follows_the_sentinels_to_the_promoted_replica(
    sentinel_redis: SentinelRedis,
) -> None:
    setup = sentinel_redis

    def settled() -> bool:
        known = setup.ask(setup.sentinel_ports[0], "sentinel", "master", PRIMARY_NAME).split("\n")
        fields = dict(zip(known[::2], known[1::2], strict=False))
        return fields.get("num-slaves") == "1" and fields.get("num-other-sentinels") == "2"

    await wait_until(settled, 30, "the sentinels to know the replica and each other")
    prefix = f"t{uuid.uuid4().hex[:8]}."
    records = JobRecords(setup.url, prefix, ttl_s=60)
    try:
        before = _job()
        await records.create([before])
        assert setup.ask(setup.primary_port, "wait", "1", "5000") == "1"  # the replica has it

        setup.processes["primary"].kill()
        setup.processes["primary"].wait(10)
        await wait_until(lambda: str(setup.replica_port) in setup.primary(), 60, "the replica's promotion")

        async def reads_again() -> bool:
            try:
                return (await records.get(before.id)) is not None
            except RecordsUnavailable:  # until it finds the new primary
                return False

        await wait_until(reads_again, 30, "the store to read from the new primary")
        found = await records.get(before.id)
        assert found is not None and found.status == "queued"
        after = _job()
        await records.create([after])
        found_after = await records.get(after.id)
        assert found_after is not None and found_after.status == "queued"
        # Written on the promoted replica, the only Redis left.
        assert setup.ask(setup.replica_port, "exists", f"{prefix}inferq:job:{after.id}") == "1"
    finally:
        await records.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+sentinel://:pw@h1,h2/", "needs /PRIMARY_NAME"),
        ("redis+sentinel:///inferq", "names no sentinel"),
        ("redis+sentinel://h1:port/inferq", "is not HOST[:PORT]"),
        ("redis+sentinel://h1/inferq/zero", "is not a number"),
    ],
)
def test_given_a_malformed_sentinel_url_then_the_settings_name_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        Environment.read({"REDIS_URL": url})


def test_a_sentinel_url_names_its_sentinels_primary_db_and_password() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:p%40ss@redis-0.h:26380,[::1],redis-2.h/inferq/3")

    assert parsed.sentinels == (("redis-0.h", 26380), ("::1", 26379), ("redis-2.h", 26379))
    assert (parsed.primary_name, parsed.db, parsed.password) == ("inferq", 3, "p@ss")
