"""Where the user's path spends its Python time, by function (`task bench -- --only profile`).

The per-process CPU split (`cpu_accounting`) says which process is busy; this says what
it is busy with. The local stack runs as `task up` runs it, an echo backlog (the model
costs nothing, so what is left is the message path) goes to one receiver host, and
py-spy samples the ingress, the worker and the dispatcher for the whole backlog.

Samples count only while a thread holds the GIL (`py-spy --gil`): Python work, not a Ray
thread waiting in C. Each process gets two top-N lists: our own functions by inclusive
share (what a piece of our code costs with everything it calls) and any function by
self share (where the time finally lands: a library, a socket write). py-spy itself
takes CPU from the same two cores, so the rate measured while profiling is lower than
the user path's and is reported only beside the profile.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import cpu_accounting
from bench.user_path import WARM_UP_JOBS, backlog_run
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess

PROFILED_ROLES = ("ingress", "worker", "dispatcher")
OWN_PACKAGES = (
    "ingress/",
    "callbacks/",
    "ray_workers/",
    "wire/",
    "broker/",
    "job_records/",
    "model_catalogue/",
    "policies/",
    "settings/",
    "metrics/",
)
SAMPLES_PER_S = 200
TOP_N = 10
PROFILER_STOP_TIMEOUT_S = 30.0
# "name (path/to/file.py:123)": the line is dropped so one function is one entry.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


class ProfilerMissing(RuntimeError):
    """py-spy is not installed next to this Python (`task venv` installs it)."""


@dataclass(frozen=True)
class Profile:
    """One process's GIL-holding samples, summarised."""

    samples: int
    own_inclusive: list[tuple[str, float]]
    self_share: list[tuple[str, float]]


def function_of(frame: str) -> str:
    """`name (file)` for a py-spy frame `name (file:line)`; other text as it is."""
    match = _FRAME.match(frame)
    return frame if match is None else f"{match['name']} ({match['file']})"


def summarise(raw: str, top_n: int = TOP_N, own_packages: tuple[str, ...] = OWN_PACKAGES) -> Profile:
    """The top functions of a py-spy `--format raw` profile (one `frame;frame;... count`
    per line, outermost first). A function counts once per sample however often it is on
    the stack (recursion), so inclusive shares never pass 1."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        functions = [function_of(frame) for frame in stack.split(";")]
        total += count
        leaves[functions[-1]] += count
        for function in set(functions):
            inclusive[function] += count
    if total == 0:
        return Profile(0, [], [])
    own = [(f, n) for f, n in inclusive.most_common() if _is_own(f, own_packages)][:top_n]
    return Profile(
        total,
        [(f, n / total) for f, n in own],
        [(f, n / total) for f, n in leaves.most_common(top_n)],
    )


def _is_own(function: str, own_packages: tuple[str, ...]) -> bool:
    """Our code, less the entry points (`__main__`), which are on every sample."""
    match = _FRAME.match(function)
    return (
        match is not None
        and match["file"].startswith(own_packages)
        and not match["file"].endswith("__main__.py")
    )


def py_spy() -> str:
    """The py-spy next to this interpreter (the venv's), else one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise ProfilerMissing("py-spy is not installed; `task venv` installs the dev dependencies")
    return found


async def _record(profiler: str, pid: int, output: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        profiler,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(SAMPLES_PER_S),
        "--gil",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stop(recorder: asyncio.subprocess.Process, role: str) -> None:
    """py-spy writes its profile when interrupted (as on Ctrl-C)."""
    recorder.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(recorder.communicate(), PROFILER_STOP_TIMEOUT_S)
    if recorder.returncode not in (0, -signal.SIGINT):
        raise RuntimeError(f"py-spy on the {role} exited {recorder.returncode}: {stderr.decode()[-500:]}")


def _one_pid(role: str) -> int:
    pids = cpu_accounting.pids_of(role)
    if len(pids) != 1:
        raise RuntimeError(f"expected one {role} process to profile, found {pids}")
    return pids[0]


async def measure_profile(amqp_url: str, count: int) -> dict[str, Any]:
    """Profiles of the ingress, worker and dispatcher over an echo backlog of `count` jobs."""
    profiler = py_spy()  # fails before anything starts
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS="echo"))
    out_dir = Path(tempfile.mkdtemp(prefix="inferq-profile-"))
    try:
        await stack.start()
        await backlog_run(stack, receiver, "echo", WARM_UP_JOBS)
        outputs = {role: out_dir / f"{role}.txt" for role in PROFILED_ROLES}
        recorders = {role: await _record(profiler, _one_pid(role), outputs[role]) for role in PROFILED_ROLES}
        try:
            run = await backlog_run(stack, receiver, "echo", count)
        finally:
            for role, recorder in recorders.items():
                await _stop(recorder, role)
        profiles = {role: summarise(outputs[role].read_text()) for role in PROFILED_ROLES}
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, ("echo",))
        shutil.rmtree(out_dir, ignore_errors=True)
    if run["lost"]:
        raise RuntimeError(
            f"profiled backlog: {run['lost']} of {count} jobs got no callback; see {stack.log}"
        )
    return {
        "jobs": count,
        "jobs_per_s_while_profiled": run["jobs_per_s"],
        "cpu_ms_per_job": run["cpu_ms_per_job"],
        "profiles": {
            role: {
                "samples": p.samples,
                "own_inclusive": p.own_inclusive,
                "self": p.self_share,
            }
            for role, p in profiles.items()
        },
    }


def profile_markdown(profile: dict[str, Any]) -> list[str]:
    """The results file's section: each process's two top-N lists."""
    cpu = ", ".join(f"{role} {ms:.2f}" for role, ms in profile["cpu_ms_per_job"].items() if ms >= 0.005)
    lines = [
        "",
        f"Where the Python time went: py-spy, GIL-holding samples, echo x{profile['jobs']} to one host "
        f"({profile['jobs_per_s_while_profiled']:.0f} jobs/s while profiled; CPU ms per job: {cpu}).",
    ]
    for role, summary in profile["profiles"].items():
        lines += ["", f"{role} ({summary['samples']} samples): our code, inclusive | any code, self", ""]
        lines += ["| our function | share | function (self) | share |", "|---|---|---|---|"]
        for n in range(max(len(summary["own_inclusive"]), len(summary["self"]))):
            own = summary["own_inclusive"][n] if n < len(summary["own_inclusive"]) else ("", 0.0)
            leaf = summary["self"][n] if n < len(summary["self"]) else ("", 0.0)
            lines.append(f"| {_code(own[0])} | {own[1]:.1%} | {_code(leaf[0])} | {leaf[1]:.1%} |")
    return lines


def _code(function: str) -> str:
    return f"`{function}`" if function else ""
