"""Where the CPU went during a run: CPU seconds per part of the path, read from /proc.

On one box the ingress, broker, worker, dispatcher, Redis, the load generator and the
callback receiver share the cores, so a path's rate is bounded by its total CPU per
job, not by any one part. A snapshot before and after a run gives each part's CPU
milliseconds per job and the ceiling they imply: `cores / total CPU per job`, the rate
the box could reach if nothing ever waited. Every process on the box is counted (the
rest lands in "other"), because a shared machine's noise is part of what was measured.
Linux only (`/proc`); elsewhere a snapshot is empty and the figures say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")

# (role, substring of the command line): the first match names a process's role.
ROLES: tuple[tuple[str, str], ...] = (
    ("profiler", "py-spy"),
    ("broker", "beam.smp"),
    ("redis", "redis-server"),
    ("ingress", "-m ingress"),
    ("worker", "ServeReplica:worker-"),
    ("dispatcher", "ServeReplica:callbacks"),
    ("receiver", "loadgen.receiver_process"),
    ("local stack", "-m local_stack"),
    ("ray (other)", "ray"),
)
LOAD_GENERATOR = "load generator"


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU seconds (user + system) per live process, keyed by pid."""

    seconds_by_pid: dict[int, tuple[str, float]]


def role_of(command_line: str, pid: int, own_pid: int) -> str:
    if pid == own_pid:
        return LOAD_GENERATOR
    return next((role for role, marker in ROLES if marker in command_line), "other")


def snapshot() -> CpuSnapshot:
    return CpuSnapshot({pid: (role, cpu_s) for pid, role, cpu_s in processes()})


def pids_of(role: str) -> list[int]:
    """The live processes with this role, lowest pid first."""
    return sorted(pid for pid, found, _ in processes() if found == role)


def processes() -> Iterator[tuple[int, str, float]]:
    """(pid, role, cumulative CPU seconds) of every live process; none without /proc."""
    ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    own_pid = os.getpid()
    if not PROC.is_dir():
        return
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended between the listing and the read
        # Fields after the parenthesised name: utime and stime are the 12th and 13th.
        fields = stat.rpartition(")")[2].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / ticks_per_s
        yield pid, role_of(command_line or stat.split()[1], pid, own_pid), cpu_s


def cpu_ms_per_job(before: CpuSnapshot, after: CpuSnapshot, jobs: int) -> dict[str, float]:
    """Each role's CPU milliseconds per job between two snapshots, largest first.

    Processes that started during the run count from zero; those that ended are lost
    (their CPU cannot be read any more), which undercounts, never overcounts."""
    used: dict[str, float] = {}
    for pid, (role, cpu_s) in after.seconds_by_pid.items():
        start_s = before.seconds_by_pid.get(pid, (role, 0.0))[1]
        used[role] = used.get(role, 0.0) + max(0.0, cpu_s - start_s)
    ranked = sorted(used.items(), key=lambda item: item[1], reverse=True)
    return {role: 1000 * seconds / max(1, jobs) for role, seconds in ranked}


def cores() -> int:
    return os.cpu_count() or 1
