"""`task loadgen -- --profile NAME [--target URL] ...`: an open-loop load generator.

Without `--target` it starts the local stack (from zero replicas, as `task up` does)
and a verifying callback receiver, each in its own process, and stops both afterwards;
with one it drives that deployment, and its callbacks must be able to reach
`--callback-url` (where this machine's receiver listens). Arrivals follow the profile
and never wait for answers. Every run is bounded by `--max-jobs` and `--duration`, then
waits at most `--drain-timeout` for the callbacks, accounts for every job, writes a
report (`load_report`), and exits 1 if anything accepted was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import uvloop

from autoscaler.queue_metrics import ManagementApi, QueueMetricUnavailable, management_url_from_amqp
from callbacks.signing import generate_secret
from loadgen.load_report import JobRecord, RunRecord, Sample, write_report
from loadgen.measurement import bench_stack_env, delete_bench_topology
from loadgen.profiles import Arrival, InvalidProfile, Profile, load_profile
from loadgen.receiver_process import ReceiverProcess
from loadgen.stack_process import StackProcess
from settings.environment import DEFAULT_AMQP_URL, Environment
from wire.topology import Topology

SAMPLE_INTERVAL_S = 1.0
CONNECTIONS = 256
_REPLICAS_LINE = re.compile(
    r'^inferq_autoscaler_replicas\{model="(?P<model>[^"]+)"\} (?P<value>[0-9.]+)$', re.M
)


class ReplicaReader(Protocol):
    async def read(self) -> dict[str, int]: ...


@dataclass
class Target:
    """Where the jobs go, where their callbacks come back, and what can be sampled."""

    base_url: str
    callback_url: str
    receiver: ReceiverProcess
    api_key: str | None = None
    management_url: str | None = None
    queue_names: tuple[str, ...] = ()
    autoscaler_metrics_url: str | None = None
    # In a cluster: reads Deployments and HPAs (loadgen.cluster_replicas.ClusterReplicas).
    cluster_replicas: ReplicaReader | None = None


@dataclass
class _Sampler:
    target: Target
    started: float
    samples: list[Sample] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Every second: queue depths (management API) and replicas (autoscaler metrics)."""
        url = self.target.management_url
        management = None if url is None else ManagementApi(url, "/", timeout_s=2.0)
        try:
            while not stop.is_set():
                sample = Sample(round(time.monotonic() - self.started, 3), await self._depths(management))
                sample.replicas.update(await self._replicas(session))
                self.samples.append(sample)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        finally:
            if management is not None:
                await management.close()

    async def _depths(self, management: ManagementApi | None) -> dict[str, int]:
        depths: dict[str, int] = {}
        if management is None:
            return depths
        for queue in self.target.queue_names:
            with contextlib.suppress(QueueMetricUnavailable):
                depths[queue] = int(await management.queue_messages(queue))
        return depths

    async def _replicas(self, session: aiohttp.ClientSession) -> dict[str, int]:
        if self.target.cluster_replicas is not None:
            return await self.target.cluster_replicas.read()
        url = self.target.autoscaler_metrics_url
        if url is None:
            return {}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                text = await response.text()
                return {m["model"]: int(float(m["value"])) for m in _REPLICAS_LINE.finditer(text)}
        return {}


async def drive(
    profile: Profile, target: Target, arrivals: list[Arrival], drain_timeout_s: float, batch: int = 1
) -> RunRecord:
    """Offer every arrival on schedule, sample meanwhile, then wait (bounded) for callbacks.
    With `batch` > 1 the arrivals go `batch` at a time (POST .../jobs/batch), each batch
    when its last job arrives, as a client that buffers would send them."""
    headers = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    jobs = [JobRecord(i, a.at_s, a.priority, a.phase) for i, a in enumerate(arrivals)]
    url = f"{target.base_url}/v1/models/{profile.model}/jobs"
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        already = len(await target.receiver.refresh())
        started = time.monotonic()
        started_wall = time.time()
        sampler = _Sampler(target, started)
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(session, stop_sampling))

        def body_of(job: JobRecord) -> dict[str, object]:
            return {"input": job.index, "callback_url": target.callback_url, "priority": job.priority}

        async def submit(group: list[JobRecord]) -> None:
            single = batch == 1
            post = session.post(
                url if single else f"{url}/batch",
                json=body_of(group[0]) if single else {"jobs": [body_of(job) for job in group]},
            )
            try:
                async with post as response:
                    answer = await response.json(content_type=None) if response.status == 202 else {}
                    views = [answer] if single else answer.get("jobs", [])
                    for job in group:
                        job.status = response.status
                    for job, view in zip(group, views, strict=False):
                        job.job_id = str(view["id"])
            except (aiohttp.ClientError, TimeoutError):
                for job in group:
                    job.status = 0
            for job in group:
                job.answered_s = time.monotonic() - started

        tasks = []
        for first in range(0, len(jobs), batch):
            group = jobs[first : first + batch]
            delay_s = started + group[-1].at_s - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)  # the arrival schedule itself (open loop)
            tasks.append(asyncio.create_task(submit(group)))
        await asyncio.gather(*tasks)
        accepted = {job.job_id for job in jobs if job.job_id}
        drain_deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < drain_deadline:
            seen = {r.job_id for r in (await target.receiver.refresh())[already:]}
            if accepted <= seen:
                break
            await asyncio.sleep(0.2)
        stop_sampling.set()
        await sampling
    callbacks = [r for r in target.receiver.records[already:] if r.job_id in accepted]
    return RunRecord(profile, started_wall, jobs, callbacks, sampler.samples)


@contextlib.asynccontextmanager
async def local_target(profile: Profile, amqp_url: str) -> AsyncIterator[Target]:
    """The local stack and a verifying receiver, each in its own process, under their own
    queue prefix; everything is stopped and deleted afterwards."""
    topology = Topology(prefix=f"loadgen-{uuid.uuid4().hex[:8]}.")
    secret = generate_secret()
    env = bench_stack_env(amqp_url, topology, secret)
    receiver = ReceiverProcess(secret)
    await receiver.start()
    stack = StackProcess(env)
    try:
        started_s = await stack.start()
        print(f"local stack ready in {started_s:.1f} s (workers at 0 replicas until jobs arrive)", flush=True)
        yield Target(
            base_url=stack.base_url,
            callback_url=receiver.url,
            receiver=receiver,
            management_url=management_url_from_amqp(amqp_url),
            queue_names=(
                *topology.job_queues(profile.model),
                *topology.chunk_queues(profile.model),
                topology.callbacks_queue,
            ),
            autoscaler_metrics_url=f"http://127.0.0.1:{stack.metrics_port}/metrics",
        )
    finally:
        await stack.stop()
        await receiver.stop()
        await delete_bench_topology(amqp_url, topology, Environment.read(env).served_models)


@contextlib.asynccontextmanager
async def remote_target(profile: Profile, args: argparse.Namespace) -> AsyncIterator[Target]:
    """A deployment at --target; this machine's receiver listens where --callback-url says."""
    parts = urlsplit(args.callback_url)
    receiver = ReceiverProcess(args.webhook_secret, host=args.receiver_bind, port=parts.port or 80)
    replicas = None
    if args.kube_namespace:
        from loadgen.cluster_replicas import ClusterReplicas  # the kubernetes client: only when asked

        replicas = ClusterReplicas(args.kube_namespace, (profile.model,))
    await receiver.start()
    try:
        yield Target(
            base_url=args.target.rstrip("/"),
            callback_url=args.callback_url,
            receiver=receiver,
            api_key=args.api_key,
            management_url=args.management_url,
            queue_names=tuple(args.queue or ()),
            cluster_replicas=replicas,
        )
    finally:
        await receiver.stop()


async def _main(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    duration_s = min(args.duration or profile.duration_s, profile.duration_s)
    arrivals = profile.schedule(args.max_jobs, duration_s, seed=args.seed)
    print(
        f"profile {profile.name}: {len(arrivals)} jobs over {duration_s:.0f} s ({profile.description})",
        flush=True,
    )
    target = remote_target(profile, args) if args.target else local_target(profile, args.amqp_url)
    async with target as where:
        record = await drive(profile, where, arrivals, args.drain_timeout, args.batch)
    summary = write_report(record, Path(args.out))
    print(summary.text, flush=True)
    return 1 if summary.lost else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="spike", help="a built-in profile or a YAML file")
    parser.add_argument("--target", help="the ingress of a deployment (default: start the local stack)")
    parser.add_argument("--api-key")
    parser.add_argument("--callback-url", help="with --target: where the deployment reaches this receiver")
    parser.add_argument("--webhook-secret", help="with --target: the deployment's WEBHOOK_SECRET, to verify")
    parser.add_argument("--receiver-bind", default="0.0.0.0", help="with --target: the receiver's address")
    parser.add_argument("--management-url", help="with --target: RabbitMQ's management API, to sample queues")
    parser.add_argument("--queue", action="append", help="with --target: a queue to sample (repeatable)")
    parser.add_argument(
        "--kube-namespace", help="with --target: read replicas from this namespace's Deployments"
    )
    parser.add_argument("--duration", type=float, help="seconds at most (default: the profile's)")
    parser.add_argument("--max-jobs", type=int, default=20_000)
    parser.add_argument(
        "--batch", type=int, default=1, help="submit N jobs per request (POST .../jobs/batch); 1: one by one"
    )
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for callbacks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="loadgen/reports")
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.target and not (args.callback_url and args.webhook_secret):
        parser.error("--target needs --callback-url and --webhook-secret")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return uvloop.run(_main(args))
    except InvalidProfile as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
