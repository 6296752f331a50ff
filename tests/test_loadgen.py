"""The load generator: profiles as data, and a short spike against the real local stack
that accounts for every job and writes a complete report (loopback only)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubernetes import client

from callbacks.signing import WebhookSigner, generate_secret
from loadgen.cluster_replicas import ClusterReplicas
from loadgen.load_report import write_report
from loadgen.load_run import drive, local_target
from loadgen.profiles import BUILT_IN, InvalidProfile, load_profile
from loadgen.receiver_process import ReceiverProcess


def test_every_built_in_profile_offers_what_it_says_within_its_bounds() -> None:
    spike = BUILT_IN["spike"]
    arrivals = spike.schedule(max_jobs=100_000, max_duration_s=spike.duration_s)
    in_spike = [a for a in arrivals if a.phase == "spike-1"]

    assert not [a for a in arrivals if a.phase in ("idle", "lull")]
    assert 0.85 * 6000 < len(in_spike) < 1.15 * 6000  # 200/s for 30 s, Poisson
    assert all(15 <= a.at_s < 45 for a in in_spike)
    assert len(spike.schedule(max_jobs=50, max_duration_s=1000)) == 50
    assert max(a.at_s for a in spike.schedule(max_jobs=100_000, max_duration_s=20)) < 20
    flood = BUILT_IN["priority-flood"].schedule(max_jobs=100_000, max_duration_s=100)
    assert {a.priority for a in flood if a.phase == "trickle"} == {"high"}
    assert {a.priority for a in flood if a.phase == "flood"} == {"high", "low"}


def test_a_profile_file_is_read_and_a_bad_one_names_its_field(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\narrivals: fixed\nphases:\n  - {name: a, duration_s: 2, rate_per_s: 5}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  - {name: a, rate_per_s: 5}\n")

    mine = load_profile(str(good))
    assert [round(a.at_s, 3) for a in mine.schedule(100, 100)] == [round(0.2 * n, 3) for n in range(1, 10)]
    with pytest.raises(InvalidProfile, match=r"phases\[0\].*duration_s"):
        load_profile(str(bad))
    with pytest.raises(InvalidProfile, match="neither a built-in profile"):
        load_profile("no-such-profile")


@pytest.mark.stack
@pytest.mark.slow
async def test_a_short_spike_on_the_local_stack_loses_nothing_and_reports_every_second(
    amqp_url: str, tmp_path: Path
) -> None:
    profile = BUILT_IN["spike-short"]
    arrivals = profile.schedule(max_jobs=600, max_duration_s=profile.duration_s)
    async with local_target(profile, amqp_url) as target:
        record = await drive(profile, target, arrivals, drain_timeout_s=60)
    summary = await asyncio.to_thread(write_report, record, tmp_path)

    report = json.loads(await asyncio.to_thread(_read, tmp_path, "*.json"))
    totals = report["totals"]
    assert summary.lost == totals["lost"] == 0
    assert totals["offered"] == len(arrivals) and totals["terminal"] == totals["accepted"] > 0
    assert totals["duplicates"] == 0 and totals["unverified"] == 0
    assert [row["second"] for row in report["seconds"]] == list(range(len(report["seconds"])))
    assert sum(row["completed"] for row in report["seconds"]) == totals["terminal"]
    assert any("echo" in row["replicas"] for row in report["seconds"])  # sampled from the autoscaler
    assert {phase["name"] for phase in report["phases"]} == {"idle", "spike-1", "lull", "spike-2"}
    assert len(await asyncio.to_thread(_read, tmp_path, "*.png", binary=True)) > 10_000
    assert "| spike-1 |" in await asyncio.to_thread(_read, tmp_path, "*.md")


def _read(folder: Path, pattern: str, binary: bool = False) -> Any:
    path = next(folder.glob(pattern))
    return path.read_bytes() if binary else path.read_text()


async def test_cluster_replicas_are_read_from_the_deployment_and_keda_s_hpa() -> None:
    """Against a local HTTP server speaking the two Kubernetes API paths it reads (loopback only)."""
    paths: list[str] = []

    async def deployment(request: web.Request) -> web.Response:
        paths.append(request.path)
        return web.json_response(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "worker-echo"},
                "spec": {
                    "selector": {"matchLabels": {"app": "w"}},
                    "template": {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": []}},
                },
                "status": {"readyReplicas": 3, "replicas": 3},
            }
        )

    async def hpa(request: web.Request) -> web.Response:
        paths.append(request.path)
        return web.json_response(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "keda-hpa-worker-echo"},
                "spec": {
                    "maxReplicas": 4,
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker-echo"},
                },
                "status": {"desiredReplicas": 4, "currentReplicas": 3},
            }
        )

    app = web.Application()
    app.router.add_get("/apis/apps/v1/namespaces/inferq/deployments/worker-echo/status", deployment)
    app.router.add_get(
        "/apis/autoscaling/v2/namespaces/inferq/horizontalpodautoscalers/keda-hpa-worker-echo/status", hpa
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{runner.addresses[0][1]}")
    configuration.client_side_validation = False
    try:
        with client.ApiClient(configuration) as api:
            replicas = await ClusterReplicas("inferq", ("echo", "embed-minilm"), api).read()
    finally:
        await runner.cleanup()

    assert replicas == {"echo": 3, "echo desired": 4}  # embed-minilm: 404, no figure this second
    assert len(paths) == 2


async def test_the_bench_receiver_counts_a_callback_verified_only_when_its_signature_holds() -> None:
    secret = generate_secret()
    receiver = ReceiverProcess(secret)
    await receiver.start()
    try:
        event = {
            "type": "job.succeeded",
            "timestamp": "2026-12-05T01:00:00+00:00",
            "data": {"id": "job-1", "status": "succeeded", "timings": {"batch_size": 3, "queued_ms": 1.5}},
        }
        body = json.dumps(event).encode()
        signed = WebhookSigner(secret).headers("msg-1", int(time.time()), body)
        forged = {**signed, "webhook-id": "msg-2"}  # the signature covers the id: it no longer holds
        async with aiohttp.ClientSession() as session:
            statuses = []
            for headers in (signed, forged):
                async with session.post(receiver.url, data=body, headers=headers) as response:
                    statuses.append(response.status)
        records = await receiver.refresh()
    finally:
        await receiver.stop()

    assert statuses == [204, 401]
    assert [(r.webhook_id, r.job_id, r.verified) for r in records] == [
        ("msg-1", "job-1", True),
        ("msg-2", "job-1", False),
    ]
    assert records[0].batch_size == 3 and records[0].queued_ms == 1.5
