"""This tree against an earlier commit on the user's path, in alternating pairs
(`task bench -- --only paired-trees --base REV`).

A change that should cost nothing (tenant lanes on a single tenant's path, say) is
checked against the commit before it. On a shared 2-core machine two runs of one tree
differ by 10-20 %, so one run of each proves nothing: each pair starts the local stack
of one tree then of the other (which goes first alternates), runs `reps` echo backlogs
to one webhook host on each, and the figure is the median of the pairs' ratios. The
earlier commit is checked out in a temporary git worktree and runs with this tree's
Python and packages; each side's run is a subprocess started in its own tree, so each
measures its own code with its own `bench.user_path`.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "PAIRED-TREES "
SIDE_TIMEOUT_S = 900.0

# What each side runs, in its own tree (so `bench.user_path` is that tree's): the local
# stack as `task up` runs it, warmed, then `reps` backlogs of `count` echo jobs.
SIDE_PROGRAM = """
import asyncio, json, sys
from bench.user_path import MODELS, WARM_UP_JOBS, backlog_run
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess

async def main(amqp_url, reps, count):
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS=",".join(MODELS)))
    runs = []
    try:
        await stack.start()
        await backlog_run(stack, receiver, "echo", WARM_UP_JOBS)
        for _ in range(reps):
            run = await backlog_run(stack, receiver, "echo", count)
            runs.append({key: run[key] for key in ("jobs_per_s", "lost", "duplicates", "cpu_ms_per_job")})
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, MODELS)
    print("PAIRED-TREES " + json.dumps(runs), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def pair_summary(pairs: list[dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Each pair's ratio of medians (this tree / base), their median and range, the ratio
    of the medians over every run, CPU ms per job by process (medians), lost, duplicates."""
    ratios = [_median_rate(pair["head"]) / _median_rate(pair["base"]) for pair in pairs]
    every = {side: [run for pair in pairs for run in pair[side]] for side in ("base", "head")}
    roles = sorted({role for runs in every.values() for run in runs for role in run["cpu_ms_per_job"]})
    cpu = {side: {role: _median_cpu(runs, role) for role in roles} for side, runs in every.items()}
    return {
        "pair_ratios": ratios,
        "median_pair_ratio": statistics.median(ratios),
        "ratio_of_medians": _median_rate(every["head"]) / _median_rate(every["base"]),
        "jobs_per_s": {side: [_median_rate(pair[side]) for pair in pairs] for side in ("base", "head")},
        "cpu_ms_per_job": cpu,
        "lost": sum(run["lost"] for runs in every.values() for run in runs),
        "duplicates": sum(run["duplicates"] for runs in every.values() for run in runs),
    }


def _median_cpu(runs: list[dict[str, Any]], role: str) -> float:
    return statistics.median(float(run["cpu_ms_per_job"].get(role, 0.0)) for run in runs)


def _median_rate(runs: list[dict[str, Any]]) -> float:
    return statistics.median(float(run["jobs_per_s"]) for run in runs)


async def measure_paired_trees(amqp_url: str, base: str, pairs: int, reps: int, count: int) -> dict[str, Any]:
    """`pairs` alternating pairs of this tree and commit `base`, `reps` backlogs of `count` each."""
    commit = _git("rev-parse", "--verify", f"{base}^{{commit}}").strip()
    worktree = Path(tempfile.mkdtemp(prefix="inferq-base-"))
    _git("worktree", "add", "--detach", "--force", str(worktree), commit)
    try:
        trees = {"base": worktree, "head": REPO}
        measured: list[dict[str, list[dict[str, Any]]]] = []
        for n in range(pairs):
            order = ("base", "head") if n % 2 == 0 else ("head", "base")
            pair = {side: await _side(trees[side], amqp_url, reps, count) for side in order}
            ratio = _median_rate(pair["head"]) / _median_rate(pair["base"])
            print(
                f"  pair {n + 1}: base {_median_rate(pair['base']):.0f}, this tree "
                f"{_median_rate(pair['head']):.0f} jobs/s, ratio {ratio:.2f}",
                flush=True,
            )
            measured.append(pair)
    finally:
        _git("worktree", "remove", "--force", str(worktree))
    head = _git("rev-parse", "--short", "HEAD").strip()
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    return {
        "base": commit[:12],
        "head": f"{head}{' + uncommitted changes' if dirty else ''}",
        "pairs": pairs,
        "reps": reps,
        "jobs": count,
        **pair_summary(measured),
    }


async def _side(tree: Path, amqp_url: str, reps: int, count: int) -> list[dict[str, Any]]:
    """One tree's runs, in a subprocess started in that tree."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIDE_PROGRAM,
        amqp_url,
        str(reps),
        str(count),
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), SIDE_TIMEOUT_S)
    for line in stdout.decode().splitlines():
        if line.startswith(RESULT_PREFIX):
            runs: list[dict[str, Any]] = json.loads(line[len(RESULT_PREFIX) :])
            return runs
    raise RuntimeError(f"the run in {tree} exited {process.returncode}: {stderr.decode()[-800:]}")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout
