"""The bench's CPU accounting: roles named from command lines, per-job milliseconds from
two snapshots, and a real snapshot that sees this process burn CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import cpu_accounting
from bench.cpu_accounting import LOAD_GENERATOR, CpuSnapshot, cpu_ms_per_job, role_of

OWN_PID = 4242


@pytest.mark.parametrize(
    ("command_line", "role"),
    [
        ("/usr/lib/erlang/erts-13.1.5/bin/beam.smp -W w -MBas ageffcbf", "broker"),
        ("redis-server 127.0.0.1:6379", "redis"),
        ("/work/main/.venv/bin/python -m ingress", "ingress"),
        ("ray::ServeReplica:worker-echo:ModelWorker-echo", "worker"),
        ("ray::ServeReplica:callbacks:CallbackDispatcherDeployment", "dispatcher"),
        ("python -m loadgen.receiver_process --host 127.0.0.1 --port 0", "receiver"),
        ("/work/main/.venv/bin/python -m local_stack", "local stack"),
        (".venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server", "ray (other)"),
        (".venv/bin/py-spy record --pid 7 --gil --output /tmp/ray/worker.txt", "profiler"),
        ("/usr/sbin/sshd -D", "other"),
    ],
)
def test_a_process_is_named_by_the_first_role_its_command_line_matches(command_line: str, role: str) -> None:
    assert role_of(command_line, 1, OWN_PID) == role


def test_the_measuring_process_is_the_load_generator_whatever_its_command_line() -> None:
    assert role_of("python -m ingress", OWN_PID, OWN_PID) == LOAD_GENERATOR


def test_per_job_milliseconds_count_new_processes_from_zero_sum_a_role_and_come_largest_first() -> None:
    before = CpuSnapshot({1: ("broker", 10.0), 2: ("worker", 5.0), 3: ("worker", 1.0)})
    after = CpuSnapshot({1: ("broker", 12.0), 2: ("worker", 5.5), 3: ("worker", 1.5), 4: ("worker", 2.0)})

    used = cpu_ms_per_job(before, after, jobs=1000)

    assert used == pytest.approx({"broker": 2.0, "worker": 3.0})
    assert list(used) == ["worker", "broker"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_real_snapshot_sees_this_process_spend_cpu() -> None:
    before = cpu_accounting.snapshot()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass

    used = cpu_ms_per_job(before, cpu_accounting.snapshot(), jobs=1)

    assert used[LOAD_GENERATOR] >= 250


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pids_of_a_role_finds_a_live_process_by_its_command_line_and_no_other() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m local_stack"])
    try:
        found = wait_for_pids("local stack", child.pid)
    finally:
        child.kill()
        child.wait()

    assert child.pid in found
    assert os.getpid() not in found  # this process is the load generator
    assert child.pid not in cpu_accounting.pids_of("ingress")


def wait_for_pids(role: str, pid: int) -> list[int]:
    """The role's pids once `pid` shows up with it (its command line is set at exec)."""
    deadline = time.monotonic() + 10
    while pid not in (found := cpu_accounting.pids_of(role)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found
