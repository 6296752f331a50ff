"""The one place the environment is read: every variable any process accepts, typed and
validated by pydantic when the process starts.

`Environment.read(env)` validates the whole mapping at once; each process then builds its
own settings object from the result (`IngressSettings`, `WorkerSettings`,
`CallbackSettings`, `StackSettings`), so a value is parsed, and its rule written, once.
A bad value stops the process with `ConfigError` naming the variable, the value (unless
it is a secret) and what the variable accepts. Empty variables count as unset.

pydantic rather than pydantic-settings: the mapping is read explicitly, so tests and the
entry points take the same path, and the per-model variables (`RETRY_DELAYS_S_<MODEL>`,
`BATCH_LATENCY_TARGET_MS_<MODEL>`) are gathered here before validation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from contract.model_catalogue import DEFAULT_CATALOGUE, Catalogue, CatalogueError, load_catalogue
from contract.model_sections import Batching
from contract.retry_tiers import RetrySchedule
from contract.topology import (
    DEFAULT_CALLBACK_RETRY_DELAYS_S,
    DEFAULT_JOB_RETRY_DELAYS_S,
    QueueType,
    Topology,
)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MODELS = ("echo", "embed-minilm")
# Never echoed back in an error: they carry credentials.
SECRET_VARIABLES = frozenset(
    {"AMQP_URL", "WEBHOOK_SECRET", "API_KEYS", "RABBITMQ_MANAGEMENT_URL", "REDIS_URL"}
)
# Per-model variables: `<PREFIX><MODEL>`, MODEL as `model_env_suffix` writes it.
PER_MODEL_PREFIXES = {
    "RETRY_DELAYS_S_": "retry_delays_s_by_model",
    "BATCH_LATENCY_TARGET_MS_": "batch_latency_target_ms_by_model",
}


class ConfigError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


CsvList = Annotated[tuple[str, ...], BeforeValidator(_split_csv)]
# Comma-separated seconds, each > 0, at least one.
Delays = Annotated[
    tuple[Annotated[float, Field(gt=0)], ...], BeforeValidator(_split_csv), Field(min_length=1)
]
Models = Annotated[tuple[str, ...], BeforeValidator(_split_csv), Field(min_length=1)]
Port = Annotated[int, Field(ge=0, le=65535)]


def model_env_suffix(model: str) -> str:
    """`embed-minilm` -> `EMBED_MINILM`, for per-model variables."""
    return model.upper().replace("-", "_")


class Environment(BaseModel):
    """Every variable, by its name, with its default and its rule."""

    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

    # Shared by every process: what is served and the topology they must agree on.
    amqp_url: str = Field(DEFAULT_AMQP_URL, alias="AMQP_URL", repr=False)
    models: Models = Field(DEFAULT_MODELS, alias="MODELS")
    enable_test_models: bool = Field(False, alias="ENABLE_TEST_MODELS")
    model_catalogue: str = Field(str(DEFAULT_CATALOGUE), alias="MODEL_CATALOGUE")
    queue_prefix: str = Field("", alias="QUEUE_PREFIX")
    # False where `python -m broker_access apply` declared the topology and each
    # component's broker user may not (least privilege): components only check it.
    declare_topology: bool = Field(True, alias="DECLARE_TOPOLOGY")
    # classic (one node: priority queues) or quorum (a cluster: replicated, one queue per
    # priority); see contract/topology.py.
    queue_type: QueueType = Field("classic", alias="QUEUE_TYPE")
    max_queue_length: int = Field(100_000, ge=1, alias="MAX_QUEUE_LENGTH")
    # Unset: each model's `jobs.retry_delays_s` in the catalogue, else DEFAULT_JOB_RETRY_DELAYS_S.
    retry_delays_s: Delays | None = Field(None, alias="RETRY_DELAYS_S")
    retry_delays_s_by_model: dict[str, Delays] = Field(default_factory=dict)
    callback_retry_delays_s: Delays = Field(DEFAULT_CALLBACK_RETRY_DELAYS_S, alias="CALLBACK_RETRY_DELAYS_S")
    retry_jitter: float = Field(0.1, ge=0, lt=1, alias="RETRY_JITTER")
    callback_allow_hosts: CsvList = Field((), alias="CALLBACK_ALLOW_HOSTS")
    # How long the callback-URL guard waits for DNS before answering "try again later".
    dns_timeout_s: float = Field(3.0, gt=0, alias="DNS_TIMEOUT_S")
    drain_timeout_s: float = Field(30.0, ge=0, alias="DRAIN_TIMEOUT_S")

    # Job records (contract/job_records.py): `off` runs without status, cancel, keys and waits.
    redis_url: str = Field(DEFAULT_REDIS_URL, alias="REDIS_URL", repr=False)
    result_ttl_s: int = Field(24 * 3600, ge=1, alias="RESULT_TTL_S")
    # Outputs over this (JSON bytes) go by callback only; the record keeps their size.
    record_output_max_bytes: int = Field(256 * 1024, ge=0, alias="RECORD_OUTPUT_MAX_BYTES")

    # The ingress.
    ingress_host: str = Field("127.0.0.1", alias="INGRESS_HOST")
    ingress_port: Port = Field(8000, alias="INGRESS_PORT")
    api_keys: CsvList = Field((), alias="API_KEYS", repr=False)
    max_body_bytes: int = Field(1024 * 1024, ge=1, alias="MAX_BODY_BYTES")
    # A body's JSON shape, checked on its bytes before it is decoded (ingress/json_budget.py).
    max_json_depth: int = Field(64, ge=2, le=512, alias="MAX_JSON_DEPTH")
    max_json_values: int = Field(200_000, ge=16, alias="MAX_JSON_VALUES")
    max_metadata_bytes: int = Field(64 * 1024, ge=2, alias="MAX_METADATA_BYTES")
    input_validation_budget_ms: float = Field(250.0, gt=0, alias="INPUT_VALIDATION_BUDGET_MS")
    # Bytes of request bodies in flight at once (ingress/inflight_bytes.py).
    max_inflight_body_bytes: int = Field(16 * 1024 * 1024, ge=1, alias="MAX_INFLIGHT_BODY_BYTES")
    max_waiters: int = Field(1024, ge=0, alias="MAX_WAITERS")
    ingress_max_connections: int = Field(2048, ge=1, alias="INGRESS_MAX_CONNECTIONS")
    ingress_access_log: bool = Field(False, alias="INGRESS_ACCESS_LOG")
    # Announce demand events (push activation: the local autoscaler and the KEDA push scaler hear them).
    demand_events: bool = Field(True, alias="DEMAND_EVENTS")
    # The explicit opt-out that lets an ingress bound beyond loopback run without API_KEYS.
    allow_unauthenticated: bool = Field(False, alias="ALLOW_UNAUTHENTICATED")

    # The model workers.
    # Batching: unset, each model's `batching` section in the catalogue; set, it wins for every model.
    batch_max_size: int | None = Field(None, ge=1, alias="BATCH_MAX_SIZE")
    batch_max_wait_ms: float | None = Field(None, ge=0, alias="BATCH_MAX_WAIT_MS")
    batch_adaptive: bool | None = Field(None, alias="BATCH_ADAPTIVE")
    batch_latency_target_ms: float | None = Field(None, ge=1, alias="BATCH_LATENCY_TARGET_MS")
    batch_latency_target_ms_by_model: dict[str, Annotated[float, Field(ge=1)]] = Field(default_factory=dict)
    # Bytes of job bodies a replica takes into one batch, and prefetches (ray_workers/job_worker.py).
    worker_batch_max_bytes: int = Field(8 * 1024 * 1024, ge=1, alias="WORKER_BATCH_MAX_BYTES")
    worker_prefetch_max_bytes: int = Field(32 * 1024 * 1024, ge=1, alias="WORKER_PREFETCH_MAX_BYTES")
    breaker_failure_threshold: int = Field(5, ge=1, alias="BREAKER_FAILURE_THRESHOLD")
    breaker_cooldown_s: float = Field(30.0, ge=0, alias="BREAKER_COOLDOWN_S")
    model_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, alias="MODEL_THREADS")
    worker_num_gpus: float = Field(0.0, ge=0, alias="WORKER_NUM_GPUS")

    # The callback stage.
    webhook_secret: str = Field("", alias="WEBHOOK_SECRET", repr=False)
    callback_timeout_s: float = Field(10.0, ge=0.1, alias="CALLBACK_TIMEOUT_S")
    callback_concurrency: int = Field(256, ge=1, alias="CALLBACK_CONCURRENCY")
    callback_host_concurrency: int = Field(64, ge=1, alias="CALLBACK_HOST_CONCURRENCY")
    callback_prefetch: int = Field(1024, ge=1, alias="CALLBACK_PREFETCH")
    callback_prefetch_max_bytes: int = Field(64 * 1024 * 1024, ge=1, alias="CALLBACK_PREFETCH_MAX_BYTES")
    callback_host_hold_max_bytes: int = Field(32 * 1024 * 1024, ge=1, alias="CALLBACK_HOST_HOLD_MAX_BYTES")
    callback_breaker_threshold: int = Field(5, ge=1, alias="CALLBACK_BREAKER_THRESHOLD")
    callback_breaker_cooldown_s: float = Field(30.0, ge=0, alias="CALLBACK_BREAKER_COOLDOWN_S")
    callback_max_deferrals: int = Field(288, ge=0, alias="CALLBACK_MAX_DEFERRALS")

    # The KEDA external push scaler (`python -m push_scaler`, cluster/base/push-scaler.yaml).
    push_scaler_host: str = Field("127.0.0.1", alias="PUSH_SCALER_HOST")
    push_scaler_port: Port = Field(9095, alias="PUSH_SCALER_PORT")
    push_scaler_active_s: float = Field(30.0, gt=0, alias="PUSH_SCALER_ACTIVE_S")

    # A Kubernetes pod (`python -m ray_workers.pod`): its probes' endpoint (/livez, /readyz).
    pod_health_host: str = Field("127.0.0.1", alias="POD_HEALTH_HOST")
    pod_health_port: Port = Field(8080, alias="POD_HEALTH_PORT")

    # The local stack (`task up`).
    rabbitmq_management_url: str | None = Field(None, alias="RABBITMQ_MANAGEMENT_URL", repr=False)
    # Unset: the ScaledObjects `task manifests` writes from the catalogue (those in keda/).
    scaledobjects_dir: str | None = Field(None, alias="SCALEDOBJECTS_DIR")
    local_autoscaler: bool = Field(True, alias="LOCAL_AUTOSCALER")
    local_push_activation: bool = Field(True, alias="LOCAL_PUSH_ACTIVATION")
    local_max_replicas: int | None = Field(None, ge=1, alias="LOCAL_MAX_REPLICAS")
    worker_replicas: int = Field(1, ge=1, alias="WORKER_REPLICAS")
    autoscaler_metrics_port: Port = Field(9101, alias="AUTOSCALER_METRICS_PORT")
    worker_metrics_port: Port = Field(9102, alias="WORKER_METRICS_PORT")
    serve_http_port: Port = Field(0, alias="SERVE_HTTP_PORT")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Environment:
        catalogue = self.catalogue
        unknown = [model for model in self.models if model not in catalogue.entries]
        if unknown:
            raise ValueError(
                f"MODELS={','.join(self.models)!r}: names unknown model(s) {unknown}; "
                f"the catalogue ({catalogue.source}) has {list(catalogue.names)}"
            )
        test_models = [m for m in self.models if m in catalogue.test_only]
        if test_models and not self.enable_test_models:
            raise ValueError(f"MODELS lists {test_models}, which needs ENABLE_TEST_MODELS=1")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"MAX_INFLIGHT_BODY_BYTES={self.max_inflight_body_bytes} is below "
                f"MAX_BODY_BYTES={self.max_body_bytes}; the in-flight budget must hold one largest body"
            )
        if self.callback_host_concurrency > self.callback_concurrency:
            raise ValueError(
                f"CALLBACK_HOST_CONCURRENCY={self.callback_host_concurrency} exceeds "
                f"CALLBACK_CONCURRENCY={self.callback_concurrency}; a host's share must fit in the total"
            )
        return self

    @classmethod
    def read(cls, env: Mapping[str, str]) -> Environment:
        """Validate `env` (os.environ at an entry point); ConfigError on the first bad value."""
        values: dict[str, Any] = {name: value for name, value in env.items() if value.strip()}
        for prefix, field_name in PER_MODEL_PREFIXES.items():
            values[field_name] = {
                name.removeprefix(prefix): value for name, value in values.items() if name.startswith(prefix)
            }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _config_error(exc, env) from None

    @property
    def records_url(self) -> str | None:
        """Where the job records live; None when REDIS_URL is `off`."""
        return None if self.redis_url.lower() == "off" else self.redis_url

    @property
    def catalogue(self) -> Catalogue:
        """The model catalogue at MODEL_CATALOGUE (default: the project's models.yaml)."""
        try:
            return load_catalogue(Path(self.model_catalogue))
        except CatalogueError as exc:
            raise ValueError(str(exc)) from None

    @property
    def served_models(self) -> tuple[str, ...]:
        """`MODELS`, plus the catalogue's test-only models when `ENABLE_TEST_MODELS` is on."""
        if not self.enable_test_models:
            return self.models
        return self.models + tuple(m for m in self.catalogue.test_only if m not in self.models)

    def topology(self) -> Topology:
        """The topology every process must agree on: names, limits and retry schedules.

        A model's job retry schedule, first found: `RETRY_DELAYS_S_<MODEL>` (e.g.
        `RETRY_DELAYS_S_EMBED_MINILM`), `RETRY_DELAYS_S`, the catalogue's
        `jobs.retry_delays_s`, the platform's default."""
        catalogue = self.catalogue
        by_model = {
            model: RetrySchedule(
                self.retry_delays_s_by_model.get(model_env_suffix(model))
                or self.retry_delays_s
                or catalogue.entry(model).jobs.retry_delays_s
                or DEFAULT_JOB_RETRY_DELAYS_S,
                self.retry_jitter,
            )
            for model in self.served_models
        }
        return Topology(
            prefix=self.queue_prefix,
            max_queue_length=self.max_queue_length,
            job_retries=RetrySchedule(self.retry_delays_s or DEFAULT_JOB_RETRY_DELAYS_S, self.retry_jitter),
            job_retries_by_model=by_model,
            callback_retries=RetrySchedule(self.callback_retry_delays_s, self.retry_jitter),
            declared_by_clients=self.declare_topology,
            queue_type=self.queue_type,
        )

    def batching(self, model: str) -> Batching:
        """The model's batching: its catalogue section, then each BATCH_* variable that is
        set, then `BATCH_LATENCY_TARGET_MS_<MODEL>`."""
        overrides = {
            "max_size": self.batch_max_size,
            "max_wait_ms": self.batch_max_wait_ms,
            "adaptive": self.batch_adaptive,
            "latency_target_ms": self.batch_latency_target_ms_by_model.get(
                model_env_suffix(model), self.batch_latency_target_ms
            ),
        }
        update = {name: value for name, value in overrides.items() if value is not None}
        return self.catalogue.entry(model).batching.model_copy(update=update)


def _config_error(exc: ValidationError, env: Mapping[str, str]) -> ConfigError:
    """The first error, as `NAME='value': what it accepts` (no value for a secret)."""
    error = exc.errors(include_url=False)[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    location = [str(part) for part in error["loc"]]
    if not location:  # a rule across variables: its message names them
        return ConfigError(message)
    name = _variable_name(location)
    if name in SECRET_VARIABLES:
        return ConfigError(f"{name}: {message}")
    item = f" (item {int(location[-1]) + 1})" if location[-1].isdigit() else ""
    return ConfigError(f"{name}={env.get(name, '')!r}{item}: {message}")


def _variable_name(location: list[str]) -> str:
    for prefix, field_name in PER_MODEL_PREFIXES.items():
        if location[0] == field_name and len(location) > 1:
            return prefix + location[1]
    alias = Environment.model_fields[location[0]].alias if location[0] in Environment.model_fields else None
    return alias or location[0]
