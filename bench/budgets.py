"""`task bench -- --only budgets`: hostile input through the local stack as `task up` runs it.

For each input: the answers (status counts), the time until the last one, the worst
`GET /healthz` latency while it ran (polled every 10 ms), and each component's peak RSS
growth over its RSS before (ingress, worker replicas, dispatcher, Redis; sampled every
50 ms from /proc). Then a Redis capped with maxmemory and noeviction, as the stack and
the cluster run it, is filled through a second ingress until it refuses: the answers
must be fast 503s, and Redis must still answer.

The targets (2 cores): the 1 MiB schema miss answered 4xx in <= 1 s, `/healthz` never
slower than 100 ms meanwhile, ingress growth <= 100 MB; 20 concurrent 1 MiB waits: ingress
growth <= 200 MB; a worker fed 40 x 1 MiB object-heavy jobs and a dispatcher holding
large outputs for a slow host stay under their pod memory limits and keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import cpu_accounting
from callbacks.signing import generate_secret
from loadgen.measurement import bench_stack_env, bench_topology, delete_bench_topology
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess, free_port

MIB = 1024 * 1024
MODELS = ("echo", "embed-minilm")
ROLES = ("ingress", "worker", "dispatcher", "redis")
HEALTH_POLL_S = 0.01
RSS_POLL_S = 0.05
UPLOAD_BYTES = 16 * 2**20
# Pod memory limits in cluster/base (what each must stay under).
POD_LIMITS_MB = {"ingress": 512, "worker": 1024, "dispatcher": 1024}
CALLBACK_WAIT_S = 180.0

JSON = {"content-type": "application/json"}
Attack = Callable[[aiohttp.ClientSession, str], Awaitable[list[int]]]


def texts_of_zeros(body_bytes: int) -> bytes:
    """`{"input": {"texts": [0, 0, ...]}}`: a schema miss on every item of embed-minilm's input."""
    return b'{"input": {"texts": [' + b",".join([b"0"] * (body_bytes // 2 - 16)) + b"]}}"


def object_heavy(body_bytes: int, extra: bytes = b"") -> bytes:
    """About `body_bytes` of `[{"kk": "vvvvvvvv"}, ...]`: a dict per 18 bytes, within the values budget."""
    item = b'{"kk":"vvvvvvvv"}'
    items = b",".join([item] * (body_bytes // (len(item) + 1)))
    return b'{"input": [' + items + b"]" + extra + b"}"


def nested(depth: int) -> bytes:
    """A request body whose JSON nests `depth` levels (the request object is the first)."""
    return (
        b'{"input": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b', "callback_url": "http://127.0.0.1:9/"}'
    )


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssWatch:
    """Each role's summed RSS, sampled until stopped; peak growth over the first sample."""

    def __init__(self, roles: tuple[str, ...] = ROLES) -> None:
        self._pids = {role: cpu_accounting.pids_of(role) for role in roles}
        self.before = self._sample()
        self.peak = dict(self.before)
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> dict[str, float]:
        return {role: sum(_rss_mb(pid) for pid in pids) for role, pids in self._pids.items()}

    async def _run(self) -> None:
        while True:
            for role, mb in self._sample().items():
                self.peak[role] = max(self.peak[role], mb)
            await asyncio.sleep(RSS_POLL_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, dict[str, float]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {
            role: {
                "before_mb": self.before[role],
                "peak_mb": self.peak[role],
                "growth_mb": self.peak[role] - mb,
            }
            for role, mb in self.before.items()
        }


async def _worst_health_s(session: aiohttp.ClientSession, done: asyncio.Event) -> float:
    worst_s = 0.0
    while not done.is_set():
        started = time.monotonic()
        async with session.get("/healthz") as response:
            await response.read()
        worst_s = max(worst_s, time.monotonic() - started)
        await asyncio.sleep(HEALTH_POLL_S)
    return worst_s


async def _accepted(session: aiohttp.ClientSession, body: bytes) -> tuple[int, str | None]:
    """An echo job's status, and its id when accepted."""
    async with session.post("/v1/models/echo/jobs", data=body, headers=JSON) as response:
        answer = await response.json()
        return response.status, answer.get("id") if response.status == 202 else None


async def _post(session: aiohttp.ClientSession, path: str, body: bytes, **headers: str) -> int:
    async with session.post(path, data=body, headers={**JSON, **headers}) as response:
        await response.read()
        return response.status


async def run_attack(base_url: str, name: str, attack: Attack, callback_url: str) -> dict[str, Any]:
    """One hostile input: answers, time, worst health latency meanwhile, RSS growth."""
    watch = RssWatch()
    watch.start()
    done = asyncio.Event()
    async with aiohttp.ClientSession(base_url, timeout=aiohttp.ClientTimeout(total=300)) as session:
        health = asyncio.create_task(_worst_health_s(session, done))
        started = time.monotonic()
        statuses = await attack(session, callback_url)
        elapsed_s = time.monotonic() - started
        done.set()
        worst_health_s = await health
    rss = await watch.stop()
    row = {
        "input": name,
        "answers": dict(Counter(str(status) for status in statuses)),
        "elapsed_s": elapsed_s,
        "worst_healthz_ms": worst_health_s * 1000,
        "rss": rss,
    }
    growth = ", ".join(f"{role} +{r['growth_mb']:.0f} MB" for role, r in rss.items())
    print(
        f"  {name}: {row['answers']} in {elapsed_s:.2f} s, worst /healthz {row['worst_healthz_ms']:.0f} ms, "
        f"{growth}",
        flush=True,
    )
    return row


def _naming_an_upload(receiver: ReceiverProcess, count: int, data: bytes, input_format: str) -> Attack:
    """Small messages naming one 16 MiB upload, at once: the worker's batch budget counts
    the inputs they name, so it reads them a batch of one at a time, not all at once; a
    JSON Lines job holds a batch of records and an output part, never the file."""

    async def attack(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        async with session.post("/v1/uploads") as created:
            upload = await created.json()
        async with aiohttp.ClientSession() as direct, direct.put(upload["upload_url"], data=data) as put:
            put.raise_for_status()
        body = b'{"input_ref": "%s", "input_format": "%s", "callback_url": "%s"}' % (
            upload["input_ref"].encode(),
            input_format.encode(),
            receiver.url.encode(),
        )
        already = {r.job_id for r in await receiver.refresh()}
        answers = await asyncio.gather(*(_accepted(session, body) for _ in range(count)))
        arrived = await receiver.wait_for(
            {job_id for _, job_id in answers if job_id} - already, CALLBACK_WAIT_S
        )
        return [*(status for status, _ in answers), *([] if arrived else [0])]

    return attack


def attacks(quick: bool, receiver: ReceiverProcess, slow: ReceiverProcess) -> list[tuple[str, Attack]]:
    waits = 5 if quick else 20
    worker_jobs = 10 if quick else 40
    slow_jobs = 20 if quick else 500
    reference_jobs = 8 if quick else 16

    async def schema_miss(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        return [await _post(session, "/v1/models/embed-minilm/jobs", texts_of_zeros(MIB))]

    async def schema_miss_in_budget(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        # About 190,000 values: just under MAX_JSON_VALUES, so the schema check does run.
        return [await _post(session, "/v1/models/embed-minilm/jobs", texts_of_zeros(380_000))]

    async def too_deep(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        return [await _post(session, "/v1/models/echo/jobs", nested(973))]

    async def superscript_wait(session: aiohttp.ClientSession, cb: str) -> list[int]:
        body = b'{"input": 1, "callback_url": "%s"}' % cb.encode()
        return [await _post(session, "/v1/models/echo/jobs", body, prefer="wait=\u00b2")]

    async def concurrent_waits(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        body = object_heavy(MIB - 100)
        return list(
            await asyncio.gather(
                *(_post(session, "/v1/models/echo/jobs", body, prefer="wait=5") for _ in range(waits))
            )
        )

    async def over_values(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        body = b'{"input": [' + b",".join([b"{}"] * (MIB // 3)) + b"]}"
        return list(
            await asyncio.gather(*(_post(session, "/v1/models/echo/jobs", body) for _ in range(waits)))
        )

    def to_receiver(target: ReceiverProcess, count: int) -> Attack:
        async def attack(session: aiohttp.ClientSession, _cb: str) -> list[int]:
            body = object_heavy(MIB - 200, b', "callback_url": "%s"' % target.url.encode())
            already = {r.job_id for r in await target.refresh()}
            statuses, ids = [], set()
            for _ in range(count):
                async with session.post("/v1/models/echo/jobs", data=body, headers=JSON) as response:
                    statuses.append(response.status)
                    if response.status == 202:
                        ids.add((await response.json())["id"])
            arrived = await target.wait_for(ids - already, CALLBACK_WAIT_S)
            return [*statuses, *([] if arrived else [0])]  # 0: a callback missing at the deadline

        return attack

    one_value = b'"' + b"u" * (UPLOAD_BYTES - 2) + b'"'
    record = b'{"text":"' + b"l" * 1000 + b'"}\n'
    lines = record * (UPLOAD_BYTES // len(record))

    return [
        ("embed-minilm 1 MiB schema miss (texts of 0)", schema_miss),
        ("embed-minilm 380 KB schema miss, within the values budget", schema_miss_in_budget),
        ("echo JSON nested 973 deep", too_deep),
        ("echo Prefer: wait=\u00b2", superscript_wait),
        (f"echo {waits} x 1 MiB object-heavy, Prefer: wait=5, at once", concurrent_waits),
        (f"echo {waits} x 1 MiB of {{}} (over the values budget), at once", over_values),
        *batch_attacks(quick),
        (
            f"worker fed {worker_jobs} x 1 MiB object-heavy jobs, called back",
            to_receiver(receiver, worker_jobs),
        ),
        (
            f"dispatcher: {slow_jobs} x 1 MiB outputs to a host answering in 2 s",
            to_receiver(slow, slow_jobs),
        ),
        (
            f"worker fed {reference_jobs} jobs naming a 16 MiB upload, at once, called back",
            _naming_an_upload(receiver, reference_jobs, one_value, "json"),
        ),
        (
            f"worker fed {reference_jobs} JSON Lines jobs naming a 16 MiB upload, at once, called back",
            _naming_an_upload(receiver, reference_jobs, lines, "jsonl"),
        ),
    ]


def batch_attacks(quick: bool) -> list[tuple[str, Attack]]:
    """Batches (POST .../jobs/batch) against the budgets a batch shares with one job."""
    batches = 2 if quick else 4

    def batch_of(jobs: list[bytes]) -> bytes:
        return b'{"jobs": [' + b",".join(jobs) + b"]}"

    async def batch_over_values(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        # 1,000 jobs of 8 KiB object-heavy input: 450,000 values, over the batch's share.
        job = object_heavy(8 * 1024)
        return [await _post(session, "/v1/models/echo/jobs/batch", batch_of([job] * 1000))]

    async def batches_in_budget(session: aiohttp.ClientSession, cb: str) -> list[int]:
        # 1,000 jobs of about 190 values each (190,000: just within MAX_JSON_VALUES), 1.7 MB.
        job = object_heavy(1600, b', "callback_url": "%s"' % cb.encode())
        body = batch_of([job] * 1000)
        return list(
            await asyncio.gather(
                *(_post(session, "/v1/models/echo/jobs/batch", body) for _ in range(batches))
            )
        )

    async def batch_of_schema_misses(session: aiohttp.ClientSession, _cb: str) -> list[int]:
        body = batch_of([b'{"input": {"texts": [0, 0, 0, 0, 0, 0, 0, 0]}}'] * 1000)
        return [await _post(session, "/v1/models/embed-minilm/jobs/batch", body)]

    return [
        ("echo batch of 1,000 jobs, 450,000 values (over the values budget)", batch_over_values),
        (f"echo {batches} x batch of 1,000 jobs, 190,000 values, 1.7 MB, at once", batches_in_budget),
        ("embed-minilm batch of 1,000 schema misses", batch_of_schema_misses),
    ]


async def measure_budgets(amqp_url: str, quick: bool) -> dict[str, Any]:
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    slow = ReceiverProcess(secret, delay_s=2.0)
    await receiver.start()
    await slow.start()
    topology = bench_topology()
    stack = StackProcess(bench_stack_env(amqp_url, topology, secret, MODELS=",".join(MODELS)))
    rows = []
    try:
        await stack.start()
        async with aiohttp.ClientSession(stack.base_url) as session:  # both models' replicas up
            for model, job_input in (("echo", b"1"), ("embed-minilm", b'"warm"')):
                body = b'{"input": %s, "callback_url": "%s"}' % (job_input, receiver.url.encode())
                await _post(session, f"/v1/models/{model}/jobs", body, prefer="wait=60")
        for name, attack in attacks(quick, receiver, slow):
            rows.append(await run_attack(stack.base_url, name, attack, receiver.url))
    finally:
        await stack.stop()
        await receiver.stop()
        await slow.stop()
        await delete_bench_topology(amqp_url, topology, MODELS)
    return {"inputs": rows, "redis_full": await measure_full_redis(amqp_url, quick)}


async def measure_full_redis(amqp_url: str, quick: bool) -> dict[str, Any]:
    """A Redis capped with noeviction (8 MB quick, else 32 MB) filled through an ingress of
    its own with keyed jobs carrying 60 KiB of metadata each, until it refuses; then the
    answers' latency."""
    maxmemory = "8mb" if quick else "32mb"
    port, redis_port = free_port(), free_port()
    topology = bench_topology()
    data_dir = tempfile.mkdtemp(prefix="inferq-bench-redis-")
    redis = await asyncio.create_subprocess_exec(
        *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""),
        *("--appendonly", "no", "--dir", data_dir),
        *("--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"),
        stdout=subprocess.DEVNULL,
    )
    env = bench_stack_env(
        amqp_url,
        topology,
        "",
        MODELS="echo",
        INGRESS_PORT=str(port),
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
    )
    ingress = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ingress", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base_url = f"http://127.0.0.1:{port}"
    metadata = b'{"m": "%s"}' % (b"x" * 60_000)
    statuses: list[int] = []
    refusal_ms: list[float] = []
    try:
        async with aiohttp.ClientSession(base_url) as session:
            await _until_ready(session)
            for n in range(200 if quick else 2000):
                body = b'{"input": 1, "callback_url": "http://127.0.0.1:9/", "metadata": %s}' % metadata
                started = time.monotonic()
                status = await _post(session, "/v1/models/echo/jobs", body, **{"idempotency-key": f"k{n}"})
                statuses.append(status)
                if status == 503:
                    refusal_ms.append((time.monotonic() - started) * 1000)
                    if len(refusal_ms) >= 20:
                        break
            async with session.get("/healthz") as health:
                ingress_alive = health.status == 200
        ping = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(redis_port), "ping", stdout=subprocess.PIPE
        )
        pong = (await ping.communicate())[0].decode().strip()
    finally:
        for process in (ingress, redis):
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
        await delete_bench_topology(amqp_url, topology, ("echo",))
    refusal_ms.sort()
    result = {
        "maxmemory": maxmemory,
        "accepted_before_full": statuses.count(202),
        "answers": dict(Counter(str(status) for status in statuses)),
        "refusal_p50_ms": refusal_ms[len(refusal_ms) // 2] if refusal_ms else None,
        "refusal_max_ms": refusal_ms[-1] if refusal_ms else None,
        "redis_answers_after": pong == "PONG",
        "ingress_answers_after": ingress_alive,
    }
    print(f"  Redis full ({maxmemory}, noeviction): {result}", flush=True)
    return result


async def _until_ready(session: aiohttp.ClientSession) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get("/readyz") as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise TimeoutError("the ingress for the full-Redis run was not ready within 60 s")


def budget_markdown(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Hostile input through the local stack (`--only budgets`): answers, time, worst /healthz "
        "meanwhile, peak RSS growth per component (MB):",
        "",
        "| input | answers | time s | worst /healthz ms | ingress | worker | dispatcher | redis |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["inputs"]:
        rss = row["rss"]
        growth = " | ".join(
            f"+{rss[role]['growth_mb']:.0f} (peak {rss[role]['peak_mb']:.0f})" for role in ROLES
        )
        answers = ", ".join(f"{status} x{count}" for status, count in row["answers"].items())
        timing = f"{row['elapsed_s']:.2f} | {row['worst_healthz_ms']:.0f}"
        lines.append(f"| {row['input']} | {answers} | {timing} | {growth} |")
    full = results["redis_full"]
    refusals = (
        f"then 503 in p50 {full['refusal_p50_ms']:.1f} ms (max {full['refusal_max_ms']:.1f} ms)"
        if full["refusal_p50_ms"] is not None
        else "and no refusal before the run's end (it never filled)"
    )
    lines += [
        "",
        f"Redis capped at {full['maxmemory']} (noeviction) filled by keyed jobs with 60 KiB metadata: "
        f"{full['accepted_before_full']} accepted, {refusals}; Redis answering after: "
        f"{full['redis_answers_after']}, ingress answering after: {full['ingress_answers_after']}.",
    ]
    return lines
