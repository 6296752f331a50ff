"""Tenants over HTTP against the real broker and Redis: API_KEYS and TENANTS_FILE side by
side, allowed models, the rate limit (shared by two ingress processes' worth of apps),
max_queued, failing open or closed, and per-tenant metrics by name."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingress.settings import IngressSettings
from ray_workers.settings import WorkerSettings
from settings.environment import ConfigError
from tenants.registry import Tenant, Tenants, key_digest, load_tenants_file
from tests.conftest import jobs_held, running_ingress, running_worker, wait_until
from tests.models import RecordingModel
from wire.topology import Topology

PLAIN_KEY = "plain-key-0123456789"
ACME_KEY = "acme-key-0123456789"
SLOW_KEY = "slow-key-0123456789"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _tenant(name: str, key: str, **limits: Any) -> Tenant:
    return Tenant(name, key_digest(key), **limits)


def _settings(base: IngressSettings, *named: Tenant) -> IngressSettings:
    return dataclasses.replace(base, api_keys=(PLAIN_KEY,), named_tenants=named)


async def _submit(client: httpx.AsyncClient, key: str, model: str = "echo") -> httpx.Response:
    job_input = None if model == "synthetic" else 1
    return await client.post(f"/v1/models/{model}/jobs", json={"input": job_input}, headers=_auth(key))


def test_a_tenants_file_is_read_and_each_mistake_is_named(tmp_path: Path) -> None:
    good = tmp_path / "tenants.yaml"
    digest = hashlib.sha256(b"their-key").hexdigest()
    good.write_text(
        "tenants:\n"
        "  - {name: acme, key: acme-key, rate_per_s: 20, burst: 40, max_queued: 100, models: [echo],\n"
        "     weight: 3}\n"
        f"  - {{name: beta, key_sha256: {digest}}}\n"
    )
    acme, beta = load_tenants_file(good, ("echo", "synthetic"))

    assert acme == Tenant("acme", key_digest("acme-key"), 20.0, 40, 100, ("echo",), weight=3.0)
    assert beta.key_sha256 == digest and beta.rate_per_s is None and beta.models is None and beta.weight == 1
    assert Tenants.of(("k1",), (acme, beta)).find("acme-key") == acme
    mistakes = {
        "both": "{name: a, key: k, key_sha256: " + digest + "}",
        "neither": "{name: a}",
        "rate without burst": "{name: a, key: k, rate_per_s: 5}",
        "unknown model": "{name: a, key: k, models: [gpt-9]}",
        "bad name": "{name: 'Not OK', key: k}",
        "unknown field": "{name: a, key: k, colour: red}",
        "no weight": "{name: a, key: k, weight: 0}",
        "too much weight": "{name: a, key: k, weight: 1001}",
    }
    for entry in mistakes.values():
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"tenants:\n  - {entry}\n")
        with pytest.raises(ConfigError, match=r"TENANTS_FILE="):
            load_tenants_file(bad, ("echo",))
    with pytest.raises(ConfigError, match="same key"):
        Tenants.of(("acme-key",), (acme,))


async def test_given_api_keys_and_named_tenants_then_each_key_works_within_its_models(
    ingress_settings: IngressSettings,
) -> None:
    acme = _tenant("acme", ACME_KEY, models=("synthetic",))
    async with running_ingress(_settings(ingress_settings, acme)) as client:
        plain = await _submit(client, PLAIN_KEY)
        acme_allowed = await _submit(client, ACME_KEY, "synthetic")
        acme_refused = await _submit(client, ACME_KEY, "echo")
        nobody = await _submit(client, "wrong-key")
        listed = (await client.get("/v1/models", headers=_auth(ACME_KEY))).json()["models"]
        status = await client.get(f"/v1/jobs/{acme_allowed.json()['id']}", headers=_auth(ACME_KEY))
        not_theirs = await client.get(f"/v1/jobs/{acme_allowed.json()['id']}", headers=_auth(PLAIN_KEY))

    assert plain.status_code == 202 and acme_allowed.status_code == 202
    assert acme_refused.status_code == 403 and acme_refused.json()["type"].endswith("/model-not-allowed")
    assert nobody.status_code == 401
    assert [model["name"] for model in listed] == ["synthetic"]
    assert status.status_code == 200 and not_theirs.status_code == 404


async def test_given_a_rate_limit_then_two_ingresses_share_it_and_a_429_says_when_and_queues_nothing(
    ingress_settings: IngressSettings, topology: Topology, amqp_url: str
) -> None:
    limited = _tenant("acme", ACME_KEY, rate_per_s=0.5, burst=4)
    settings = _settings(ingress_settings, limited)
    async with running_ingress(settings) as first, running_ingress(settings) as second:
        answers = [await _submit(client, ACME_KEY) for client in (first, second, first, second)]
        refused = await _submit(second, ACME_KEY)
        batch = await first.post(
            "/v1/models/echo/jobs/batch",
            json={"jobs": [{"input": n} for n in range(5)]},
            headers=_auth(ACME_KEY),
        )
        unlimited = await _submit(first, PLAIN_KEY)
        metrics = (await first.get("/metrics")).text + (await second.get("/metrics")).text

    assert [answer.status_code for answer in answers] == [202] * 4
    assert answers[0].headers["ratelimit-policy"] == '"burst";q=4;w=8'
    assert answers[-1].headers["ratelimit"].startswith('"burst";r=0;t=')
    assert refused.status_code == 429 and refused.json()["type"].endswith("/rate-limited")
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert refused.headers["ratelimit"].startswith('"burst";r=0;')
    assert batch.status_code == 422 and batch.json()["type"].endswith("/batch-over-burst")
    assert unlimited.status_code == 202 and "ratelimit" not in unlimited.headers
    assert await jobs_held(amqp_url, topology, "echo") == 5
    assert 'inferq_tenant_requests_refused_total{reason="rate-limited",tenant="acme"} 1.0' in metrics
    assert 'inferq_tenant_jobs_accepted_total{model="echo",tenant="acme"}' in metrics
    assert ACME_KEY not in metrics and key_digest(ACME_KEY)[:32] not in metrics


async def test_given_max_queued_then_the_tenant_waits_for_its_jobs_to_end_and_others_do_not(
    ingress_settings: IngressSettings, worker_settings: WorkerSettings, topology: Topology, amqp_url: str
) -> None:
    capped = _tenant("acme", ACME_KEY, max_queued=3)
    async with running_ingress(_settings(ingress_settings, capped)) as client:
        held = [(await _submit(client, ACME_KEY)).json()["id"] for _ in range(3)]
        over = await _submit(client, ACME_KEY)
        batch_over = await client.post(
            "/v1/models/echo/jobs/batch", json={"jobs": [{"input": 1}]}, headers=_auth(ACME_KEY)
        )
        others = await _submit(client, PLAIN_KEY)
        await client.post(f"/v1/jobs/{held[0]}/cancel", headers=_auth(ACME_KEY))
        after_cancel = await _submit(client, ACME_KEY)
        async with running_worker(RecordingModel(), worker_settings) as worker:

            async def ended() -> bool:
                records = [
                    (await client.get(f"/v1/jobs/{i}", headers=_auth(ACME_KEY))).json() for i in held[1:]
                ]
                other = await client.get(f"/v1/jobs/{others.json()['id']}", headers=_auth(PLAIN_KEY))
                return all(record["status"] == "succeeded" for record in [*records, other.json()])

            await wait_until(ended, 10, "acme's jobs and the other tenant's to end")
            completed = worker.metrics.sink.registry.get_sample_value(  # type: ignore[attr-defined]
                "inferq_tenant_jobs_completed_total",
                {"tenant": "acme", "model": "echo", "outcome": "succeeded"},
            )
        room_again = await client.post(
            "/v1/models/echo/jobs/batch",
            json={"jobs": [{"input": n} for n in range(3)]},
            headers=_auth(ACME_KEY),
        )
        full_again = await _submit(client, ACME_KEY)

    assert over.status_code == 429 and over.json()["type"].endswith("/quota-exceeded")
    assert over.json()["queued"] == 3 and over.headers["retry-after"]
    assert batch_over.status_code == 429
    assert others.status_code == 202 and after_cancel.status_code == 202
    assert room_again.status_code == 202 and full_again.status_code == 429
    assert completed == 3  # the two held jobs not canceled and the one after the cancel, by name
    assert await jobs_held(amqp_url, topology, "echo") == 3


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.mark.parametrize("fail_open", [True, False])
async def test_given_redis_unreachable_then_limits_fail_open_or_closed_as_set(
    ingress_settings: IngressSettings, fail_open: bool
) -> None:
    limited = _tenant("acme", ACME_KEY, rate_per_s=1, burst=1, max_queued=1)
    settings = dataclasses.replace(
        _settings(ingress_settings, limited),
        redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
        tenant_limits_fail_open=fail_open,
    )
    async with running_ingress(settings) as client:
        answers = await asyncio.gather(*(_submit(client, ACME_KEY) for _ in range(3)))

    statuses = sorted(answer.status_code for answer in answers)
    if fail_open:
        assert statuses == [202, 202, 202]
    else:
        assert statuses == [503, 503, 503]
        assert answers[0].json()["type"].endswith("/limits-unavailable") and answers[0].headers["retry-after"]


def test_given_a_tenants_file_in_the_environment_then_the_ingress_reads_it_and_refuses_what_cannot_hold(
    tmp_path: Path,
) -> None:
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text("tenants:\n  - {name: acme, key: acme-key, rate_per_s: 5, burst: 5}\n")
    env = {"TENANTS_FILE": str(tenants_file), "INGRESS_HOST": "0.0.0.0"}

    settings = IngressSettings.from_env(env)  # a named tenant is authentication: any bind is fine

    assert settings.tenants.find("acme-key") == _tenant("acme", "acme-key", rate_per_s=5.0, burst=5)
    with pytest.raises(ConfigError, match=r"\['acme'\] have limits.*REDIS_URL=off"):
        IngressSettings.from_env({**env, "REDIS_URL": "off"})
