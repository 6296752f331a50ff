"""The ingress's settings, read once from the environment at start."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ingress.json_budget import JsonBudget
from job_records.store import DEFAULT_RECORD_OUTPUT_MAX_BYTES
from model_catalogue.catalogue import DEFAULT_CATALOGUE
from object_store.store import StoreSettings
from policies.callback_guard import AllowList
from settings.environment import DEFAULT_AMQP_URL, ConfigError, Environment
from tenants.registry import Tenant, Tenants, load_tenants_file
from wire.topology import Topology


@dataclass(frozen=True)
class IngressSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Named tenants from TENANTS_FILE (tenants.registry); API_KEYS are tenants too.
    named_tenants: tuple[Tenant, ...] = field(default=(), repr=False)
    tenant_limits_fail_open: bool = True
    callback_allow: AllowList = field(default_factory=AllowList)
    dns_timeout_s: float = 3.0
    max_body_bytes: int = 1024 * 1024
    batch_max_jobs: int = 1000
    max_batch_body_bytes: int = 8 * 1024 * 1024
    # The request body's JSON shape (depth, values), checked on its bytes before decoding.
    json_budget: JsonBudget = field(default_factory=JsonBudget)
    # A job's metadata, as JSON: it is kept in the job's record and sent with every event.
    max_metadata_bytes: int = 64 * 1024
    # How long checking an input against its model's schema may take.
    input_validation_budget_ms: float = 250.0
    # Request bodies held at once (reserved by Content-Length), before 503 + Retry-After.
    max_inflight_body_bytes: int = 16 * 1024 * 1024
    # Requests waiting with `Prefer: wait` at once; past it the preference is not applied.
    max_waiters: int = 1024
    # Open connections uvicorn serves at once; past it it answers 503.
    max_connections: int = 2048
    models: tuple[str, ...] = ("echo", "embed-minilm")
    # The model catalogue (models.yaml): descriptions and input schemas of the models.
    model_catalogue: str = str(DEFAULT_CATALOGUE)
    topology: Topology = field(default_factory=Topology)
    publish_timeout_s: float = 10.0
    retry_after_s: int = 5
    # One log line per request costs about a tenth of the ingress's CPU at a backlog.
    access_log: bool = False
    # Demand events for push activation (ingress.demand).
    demand_events: bool = True
    # Job records (status, cancel, Idempotency-Key, Prefer: wait); None runs without them.
    redis_url: str | None = field(default=None, repr=False)
    result_ttl_s: int = 24 * 3600
    record_output_max_bytes: int = DEFAULT_RECORD_OUTPUT_MAX_BYTES
    # Uploads and `input_ref`; None: off.
    object_store: StoreSettings | None = field(default=None, repr=False)
    upload_max_bytes: int = 1024**3
    upload_url_ttl_s: int = 3600
    store_sweep_interval_s: float = 600.0

    @functools.cached_property
    def tenants(self) -> Tenants:
        return Tenants.of(self.api_keys, self.named_tenants)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IngressSettings:
        read = Environment.read(env)
        named = (
            ()
            if read.tenants_file is None
            else load_tenants_file(Path(read.tenants_file), read.served_models)
        )
        limited = [tenant.name for tenant in named if tenant.rate_limited or tenant.max_queued is not None]
        if limited and read.records_url is None:
            raise ConfigError(
                f"tenants {limited} have limits, which live in Redis; REDIS_URL=off cannot enforce them"
            )
        if (
            not read.api_keys
            and not named
            and not _is_loopback(read.ingress_host)
            and not read.allow_unauthenticated
        ):
            raise ConfigError(
                f"INGRESS_HOST={read.ingress_host!r} is reachable beyond this machine and API_KEYS is empty: "
                "anyone could submit jobs and make the callbacks POST to any public URL. Set API_KEYS, "
                "or ALLOW_UNAUTHENTICATED=1 to run open on purpose"
            )
        return cls(
            amqp_url=read.amqp_url,
            host=read.ingress_host,
            port=read.ingress_port,
            api_keys=read.api_keys,
            named_tenants=named,
            tenant_limits_fail_open=read.tenant_limits_fail_open,
            callback_allow=AllowList.parse(read.callback_allow_hosts),
            dns_timeout_s=read.dns_timeout_s,
            max_body_bytes=read.max_body_bytes,
            batch_max_jobs=read.batch_max_jobs,
            max_batch_body_bytes=read.max_batch_body_bytes,
            json_budget=JsonBudget(read.max_json_depth, read.max_json_values),
            input_validation_budget_ms=read.input_validation_budget_ms,
            max_metadata_bytes=read.max_metadata_bytes,
            max_inflight_body_bytes=read.max_inflight_body_bytes,
            max_waiters=read.max_waiters,
            max_connections=read.ingress_max_connections,
            models=read.served_models,
            model_catalogue=read.model_catalogue,
            topology=read.topology(),
            access_log=read.ingress_access_log,
            demand_events=read.demand_events,
            redis_url=read.records_url,
            result_ttl_s=read.result_ttl_s,
            record_output_max_bytes=read.record_output_max_bytes,
            object_store=read.object_store,
            upload_max_bytes=read.upload_max_bytes,
            upload_url_ttl_s=read.upload_url_ttl_s,
            store_sweep_interval_s=read.store_sweep_interval_s,
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
