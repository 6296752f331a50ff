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

from job_records.sentinel_url import is_sentinel_url, parse_sentinel_url
from model_catalogue.catalogue import DEFAULT_CATALOGUE, Catalogue, CatalogueError, load_catalogue
from model_catalogue.sections import Batching
from object_store.store import StoreSettings
from wire.retry_tiers import RetrySchedule
from wire.topology import (
    DEFAULT_CALLBACK_RETRY_DELAYS_S,
    DEFAULT_JOB_RETRY_DELAYS_S,
    DEFAULT_TENANT_LANES,
    MAX_TENANT_LANES,
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


def default_model_threads() -> int:
    """A model replica's threads when MODEL_THREADS is unset: the machine's cores. MiniLM
    runs a batch's chunks on them side by side; a model of your own that splits each
    operation over them (intra-op) may spin at its barriers when the ingress, broker and
    dispatcher share the cores, and may do better with one core fewer
    (docs/pages/performance.md, "Model threads and chunks")."""
    return os.cpu_count() or 1


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
    amqp_url: str = Field(
        DEFAULT_AMQP_URL,
        alias="AMQP_URL",
        repr=False,
        description=(
            "RabbitMQ; several nodes of one cluster comma-separated (a connection moves to another node "
            "when its own stays away 3 s)"
        ),
    )
    models: Models = Field(
        DEFAULT_MODELS,
        alias="MODELS",
        description="models served: entries of the model catalogue (`models.yaml`)",
    )
    enable_test_models: bool = Field(
        False, alias="ENABLE_TEST_MODELS", description="adds the catalogue's test-only models (`synthetic`)"
    )
    model_catalogue: str = Field(
        str(DEFAULT_CATALOGUE),
        alias="MODEL_CATALOGUE",
        description=(
            "the model catalogue: classes, descriptions, input schemas, resources, batching, scaling, "
            "retries (default: the project's `models.yaml`)"
        ),
    )
    queue_prefix: str = Field(
        "",
        alias="QUEUE_PREFIX",
        description="prefix for every exchange and queue name (isolates environments on one broker)",
    )
    # False where `python -m broker_access apply` declared the topology and each
    # component's broker user may not (least privilege): components only check it.
    declare_topology: bool = Field(
        True,
        alias="DECLARE_TOPOLOGY",
        description=(
            "each process declares the topology at start; `false` where `python -m broker_access apply` "
            "declared it and the process's broker user may not (a cluster): it only checks, passively, that"
            " its queues exist"
        ),
    )
    # classic (one node: priority queues) or quorum (a cluster: replicated, one queue per
    # priority); see wire/topology.py.
    queue_type: QueueType = Field(
        "classic",
        alias="QUEUE_TYPE",
        description=(
            "`classic` (one node: priority queues) or `quorum` (a cluster: replicated, a queue per priority)"
        ),
    )
    classic_queue_version: int = Field(
        2,
        ge=1,
        le=2,
        alias="CLASSIC_QUEUE_VERSION",
        description=(
            "`QUEUE_TYPE=classic`: the job queues' classic-queue version. 2 confirms a job's publish, "
            "which its 202 waits for, 0.5-0.8 ms sooner than 1; the job reaches its worker about 0.4 ms "
            "later and the broker spends about 25 us more per job. A job queue already declared as 1 "
            "stays 1"
        ),
    )
    tenant_lanes: int = Field(
        DEFAULT_TENANT_LANES,
        ge=1,
        le=MAX_TENANT_LANES,
        alias="TENANT_LANES",
        description=(
            "queues per model (and priority) that tenants' new jobs are spread over, so one tenant's "
            "backlog is not a queue the others wait behind; 1: one queue, first come first served"
        ),
    )
    max_queue_length: int = Field(
        100_000,
        ge=1,
        alias="MAX_QUEUE_LENGTH",
        description=(
            "jobs per model queue beyond which the ingress answers 503 (new jobs only; retries always come "
            "back)"
        ),
    )
    # Unset: each model's `jobs.retry_delays_s` in the catalogue, else DEFAULT_JOB_RETRY_DELAYS_S.
    retry_delays_s: Delays | None = Field(
        None,
        alias="RETRY_DELAYS_S",
        description=(
            "job retry tiers in seconds (attempts = tiers + 1); unset: each model's `jobs.retry_delays_s` "
            "in the catalogue, else `1,10,60,600`"
        ),
    )
    retry_delays_s_by_model: dict[str, Delays] = Field(
        default_factory=dict,
        description="one model's job retry tiers; wins over `RETRY_DELAYS_S` and the catalogue",
    )
    callback_retry_delays_s: Delays = Field(
        DEFAULT_CALLBACK_RETRY_DELAYS_S,
        alias="CALLBACK_RETRY_DELAYS_S",
        description="waits before callback delivery attempts 2, 3, ...",
    )
    retry_jitter: float = Field(
        0.1, ge=0, lt=1, alias="RETRY_JITTER", description="fraction of its delay a retry may come early"
    )
    callback_allow_hosts: CsvList = Field(
        (),
        alias="CALLBACK_ALLOW_HOSTS",
        description=(
            "hosts or CIDRs exempt from the callback-URL guard's public-address rule, comma-separated"
        ),
    )
    # How long the callback-URL guard waits for DNS before answering "try again later".
    dns_timeout_s: float = Field(
        3.0,
        gt=0,
        alias="DNS_TIMEOUT_S",
        description="how long the callback-URL guard waits for DNS (then 503 at submit, a retry at delivery)",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, alias="DRAIN_TIMEOUT_S", description="how long a stopping worker finishes its batch"
    )

    # Job records (job_records/store.py): `off` runs without status, cancel, keys and waits.
    redis_url: str = Field(
        DEFAULT_REDIS_URL,
        alias="REDIS_URL",
        repr=False,
        description=(
            "the job records (status, cancel, `Idempotency-Key`, `Prefer: wait`): `redis://...`, or "
            "`redis+sentinel://[:PASSWORD@]HOST[:PORT][,...]/PRIMARY_NAME[/DB]` for a Redis Sentinel "
            "keeps available; `off` runs without them (`callback_url` then required)"
        ),
    )
    result_ttl_s: int = Field(
        24 * 3600,
        ge=1,
        alias="RESULT_TTL_S",
        description="how long job records and idempotency keys are kept",
    )

    # Inputs by reference (object_store/): uploads the ingress presigns, read by the worker.
    s3_endpoint_url: str | None = Field(
        None,
        alias="S3_ENDPOINT_URL",
        description=(
            "the S3-compatible store for `POST /v1/uploads` and `input_ref` (S3, Cloud Storage's "
            "XML API, MinIO); unset, uploads are off, but `task up` and `task demo` start a local one"
        ),
    )
    s3_public_endpoint_url: str | None = Field(
        None,
        alias="S3_PUBLIC_ENDPOINT_URL",
        description=(
            "the store's address as callers reach it, for the presigned `upload_url` and `output_url` "
            "(unset: `S3_ENDPOINT_URL`); the kind overlay's MinIO is reached from inside the cluster at "
            "one address and through `kubectl port-forward` at another"
        ),
    )
    s3_bucket: str = Field("inferq", min_length=3, alias="S3_BUCKET", description="the store's bucket")
    s3_region: str = Field("us-east-1", alias="S3_REGION", description="the store's region (for signing)")
    s3_access_key_id: str | None = Field(
        None, alias="S3_ACCESS_KEY_ID", repr=False, description="the store's access key (HMAC key on GCS)"
    )
    s3_secret_access_key: str | None = Field(
        None, alias="S3_SECRET_ACCESS_KEY", repr=False, description="the store's secret key"
    )
    upload_max_bytes: int = Field(
        1024**3,
        ge=1,
        alias="UPLOAD_MAX_BYTES",
        description="the largest upload a job may name (checked when the job is submitted and read)",
    )
    output_inline_max_bytes: int = Field(
        256 * 1024,
        ge=1,
        alias="OUTPUT_INLINE_MAX_BYTES",
        description=(
            "outputs larger than this are written to the object store and travel as `output_url`, "
            "`output_size` and `output_sha256` (without a store they stay inline)"
        ),
    )
    upload_url_ttl_s: int = Field(
        3600,
        ge=60,
        le=7 * 24 * 3600,
        alias="UPLOAD_URL_TTL_S",
        description="how long a presigned upload URL stays valid",
    )
    input_url_timeout_s: float = Field(
        120.0,
        gt=0,
        alias="INPUT_URL_TIMEOUT_S",
        description=(
            "how long a worker may take to fetch a job's `input_url` (then the job is retried); the "
            "URL goes through the callback-URL guard, and its body may hold `UPLOAD_MAX_BYTES`"
        ),
    )
    store_sweep_interval_s: float = Field(
        600.0,
        gt=0,
        alias="STORE_SWEEP_INTERVAL_S",
        description=(
            "how often an ingress deletes the uploads and outputs older than `RESULT_TTL_S` "
            "(each object expires with its job's record)"
        ),
    )
    # Outputs over this (JSON bytes) go by callback only; the record keeps their size.
    record_output_max_bytes: int = Field(
        256 * 1024,
        ge=0,
        alias="RECORD_OUTPUT_MAX_BYTES",
        description=(
            "larger outputs (JSON bytes) are not kept in the job's record: callback only, the record says "
            "`output_omitted`"
        ),
    )

    # The ingress.
    ingress_host: str = Field(
        "127.0.0.1",
        alias="INGRESS_HOST",
        description="the ingress's bind address (beyond loopback it refuses to start without `API_KEYS`)",
    )
    ingress_port: Port = Field(8000, alias="INGRESS_PORT", description="the ingress's port")
    api_keys: CsvList = Field(
        (),
        alias="API_KEYS",
        repr=False,
        description=(
            "comma-separated bearer keys; empty: authentication off, logged loudly, refused beyond loopback"
        ),
    )
    tenants_file: str | None = Field(
        None,
        alias="TENANTS_FILE",
        description=(
            "YAML of named tenants (key, rate_per_s + burst, max_queued, weight, models); with "
            "`API_KEYS`, each key a tenant without limits"
        ),
    )
    tenant_limits_fail_open: bool = Field(
        True,
        alias="TENANT_LIMITS_FAIL_OPEN",
        description=(
            "while Redis does not answer, accept a limited tenant's jobs unchecked (1) or answer 503 (0)"
        ),
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, alias="MAX_BODY_BYTES", description="request body limit (413 beyond)"
    )
    # A batch (POST /v1/models/{model}/jobs/batch): its jobs and its body's bytes.
    batch_max_jobs: int = Field(
        1000, ge=1, le=100_000, alias="BATCH_MAX_JOBS", description="jobs one batch request may hold (422)"
    )
    max_batch_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        alias="MAX_BATCH_BODY_BYTES",
        description="a batch request's body limit (413 beyond); the batch shares one job's `MAX_JSON_VALUES`",
    )
    # A body's JSON shape, checked on its bytes before it is decoded (ingress/json_budget.py).
    max_json_depth: int = Field(
        64,
        ge=2,
        le=512,
        alias="MAX_JSON_DEPTH",
        description="a body's JSON nesting, counted on its bytes before decoding (422 `json-too-deep`)",
    )
    max_json_values: int = Field(
        200_000,
        ge=16,
        alias="MAX_JSON_VALUES",
        description="a body's JSON values, counted on its bytes before decoding (413 `too-many-json-values`)",
    )
    max_metadata_bytes: int = Field(
        64 * 1024, ge=2, alias="MAX_METADATA_BYTES", description="a job's metadata as JSON (413)"
    )
    input_validation_budget_ms: float = Field(
        250.0,
        gt=0,
        alias="INPUT_VALIDATION_BUDGET_MS",
        description="longest the input's schema check may take (422 `input-too-complex`)",
    )
    # Bytes of request bodies in flight at once (ingress/inflight_bytes.py).
    max_inflight_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        alias="MAX_INFLIGHT_BODY_BYTES",
        description=(
            "request bodies one ingress holds at once (503 `ingress-busy` + Retry-After beyond); at least "
            "`MAX_BODY_BYTES` and `MAX_BATCH_BODY_BYTES`"
        ),
    )
    max_waiters: int = Field(
        1024,
        ge=0,
        alias="MAX_WAITERS",
        description="`Prefer: wait` requests held at once; beyond, the job is answered 202 at once",
    )
    ingress_max_connections: int = Field(
        2048,
        ge=1,
        alias="INGRESS_MAX_CONNECTIONS",
        description="connections uvicorn serves at once (503 beyond)",
    )
    ingress_access_log: bool = Field(
        False, alias="INGRESS_ACCESS_LOG", description="one log line per request"
    )
    # Announce demand events (push activation: the local autoscaler and the KEDA push scaler hear them).
    demand_events: bool = Field(
        True,
        alias="DEMAND_EVENTS",
        description=(
            "the ingress announces demand (`model.<name>.demand`) so the autoscalers wake a model from zero"
            " at once"
        ),
    )
    # The explicit opt-out that lets an ingress bound beyond loopback run without API_KEYS.
    allow_unauthenticated: bool = Field(
        False,
        alias="ALLOW_UNAUTHENTICATED",
        description=(
            "lets an ingress bound beyond loopback run without `API_KEYS` (it refuses to start otherwise)"
        ),
    )

    # The model workers.
    # Batching: unset, each model's `batching` section in the catalogue; set, it wins for every model.
    batch_max_size: int | None = Field(
        None,
        ge=1,
        alias="BATCH_MAX_SIZE",
        description="largest batch; set, it wins over each model's `batching` section (default there 128)",
    )
    batch_max_wait_ms: float | None = Field(
        None,
        ge=0,
        alias="BATCH_MAX_WAIT_MS",
        description=(
            "longest wait to fill a batch under backlog; set, it wins over the catalogue (default there 5)"
        ),
    )
    batch_adaptive: bool | None = Field(
        None,
        alias="BATCH_ADAPTIVE",
        description=(
            "off: every batch aims for the largest size; set, it wins over the catalogue (default there on)"
        ),
    )
    batch_latency_target_ms: float | None = Field(
        None,
        ge=1,
        alias="BATCH_LATENCY_TARGET_MS",
        description=(
            "model time per batch the adaptive controller keeps under; set, it wins over the catalogue "
            "(default there 200)"
        ),
    )
    batch_latency_target_ms_by_model: dict[str, Annotated[float, Field(ge=1)]] = Field(
        default_factory=dict, description="one model's latency target; wins over `BATCH_LATENCY_TARGET_MS`"
    )
    # Bytes of job bodies a replica takes into one batch, and prefetches (ray_workers/job_worker.py).
    worker_batch_max_bytes: int = Field(
        8 * 1024 * 1024, ge=1, alias="WORKER_BATCH_MAX_BYTES", description="job bodies one batch may hold"
    )
    worker_prefetch_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1,
        alias="WORKER_PREFETCH_MAX_BYTES",
        description="job bodies a replica prefetches (classic queues)",
    )
    quick_batch_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        alias="QUICK_BATCH_MS",
        description=(
            "a batch whose model's last batch took less than this is marked running and ended in "
            "one Redis round trip after it ran, not one before and one after; a job canceled "
            "meanwhile then runs, its ending dropped (0: every batch is marked running first)"
        ),
    )
    breaker_failure_threshold: int = Field(
        5,
        ge=1,
        alias="BREAKER_FAILURE_THRESHOLD",
        description="consecutive model failures that open a model's circuit breaker",
    )
    breaker_cooldown_s: float = Field(
        30.0,
        ge=0,
        alias="BREAKER_COOLDOWN_S",
        description="how long an open model breaker waits before it lets a batch try",
    )
    model_threads: int = Field(
        default_factory=default_model_threads,
        ge=1,
        alias="MODEL_THREADS",
        description=(
            "threads per model replica (`OMP_NUM_THREADS`; Ray would pin 1); default: the machine's "
            "cores (a cluster's worker pods: the pod's CPUs per worker process)"
        ),
    )
    worker_num_gpus: float = Field(
        0.0,
        ge=0,
        alias="WORKER_NUM_GPUS",
        description="GPUs Ray reserves per model replica (a pod's setting)",
    )
    worker_processes_per_gpu: int = Field(
        1,
        ge=1,
        le=32,
        alias="WORKER_PROCESSES_PER_GPU",
        description=(
            "worker processes sharing a pod's GPU, each with its own event loop (a pod's setting, "
            "from the catalogue's `resources.processes_per_gpu`; ignored without `WORKER_NUM_GPUS`)"
        ),
    )

    # The callback stage.
    webhook_secret: str = Field(
        "",
        alias="WEBHOOK_SECRET",
        repr=False,
        description=(
            "`whsec_<base64>` signing key; several, space-separated, for key rotation (all sign); `task up`"
            " generates and prints one when unset"
        ),
    )
    callback_timeout_s: float = Field(
        10.0, ge=0.1, alias="CALLBACK_TIMEOUT_S", description="one delivery attempt, answer included"
    )
    callback_concurrency: int = Field(
        256, ge=1, alias="CALLBACK_CONCURRENCY", description="deliveries in flight"
    )
    callback_host_concurrency: int = Field(
        64,
        ge=1,
        alias="CALLBACK_HOST_CONCURRENCY",
        description=(
            "deliveries in flight per callback host (kept-alive connections); at most `CALLBACK_CONCURRENCY`"
        ),
    )
    callback_prefetch: int = Field(
        1024,
        ge=1,
        alias="CALLBACK_PREFETCH",
        description=(
            "messages the dispatcher holds (each one event, or up to 64 of one host's from a worker's "
            "batch); one host holds at most half"
        ),
    )
    callback_prefetch_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        alias="CALLBACK_PREFETCH_MAX_BYTES",
        description="message bytes the dispatcher holds unsettled (classic queues)",
    )
    callback_host_hold_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1,
        alias="CALLBACK_HOST_HOLD_MAX_BYTES",
        description="message bytes the dispatcher holds for one host",
    )
    callback_breaker_threshold: int = Field(
        5,
        ge=1,
        alias="CALLBACK_BREAKER_THRESHOLD",
        description="consecutive failures that open a callback host's breaker",
    )
    callback_breaker_cooldown_s: float = Field(
        30.0,
        ge=0,
        alias="CALLBACK_BREAKER_COOLDOWN_S",
        description="how long an open host breaker waits before it lets one delivery try",
    )
    callback_max_deferrals: int = Field(
        288,
        ge=0,
        alias="CALLBACK_MAX_DEFERRALS",
        description=(
            "returns to a delay tier without an attempt (breaker open, host saturated) before a callback is"
            " parked"
        ),
    )
    callback_express: bool = Field(
        True,
        alias="CALLBACK_EXPRESS",
        description=(
            "at low load a lone job's callback reaches the dispatcher through Redis as its ending is "
            "recorded, a broker hop sooner; its broker copy stays the durable one (0: the broker alone)"
        ),
    )

    # The KEDA external push scaler (`python -m push_scaler`, cluster/base/push-scaler.yaml).
    push_scaler_host: str = Field(
        "127.0.0.1", alias="PUSH_SCALER_HOST", description="the KEDA external push scaler's gRPC bind address"
    )
    push_scaler_port: Port = Field(
        9095, alias="PUSH_SCALER_PORT", description="the KEDA external push scaler's gRPC port"
    )
    push_scaler_instance: str = Field(
        "",
        alias="PUSH_SCALER_INSTANCE",
        pattern=r"^[A-Za-z0-9_-]*$",
        description=(
            "this push scaler's name where several run (a pod's name): each hears every demand "
            "event on a queue of its own"
        ),
    )
    push_scaler_active_s: float = Field(
        30.0,
        gt=0,
        alias="PUSH_SCALER_ACTIVE_S",
        description="how long one demand event keeps a model active for KEDA",
    )

    # A Kubernetes pod (`python -m ray_workers.pod`): its probes' endpoint (/livez, /readyz).
    pod_health_host: str = Field(
        "127.0.0.1",
        alias="POD_HEALTH_HOST",
        description="a worker pod's probe endpoint (`/livez`, `/readyz`): bind address",
    )
    pod_health_port: Port = Field(
        8080, alias="POD_HEALTH_PORT", description="a worker pod's probe endpoint: port"
    )

    # The local stack (`task up`).
    rabbitmq_management_url: str | None = Field(
        None,
        alias="RABBITMQ_MANAGEMENT_URL",
        repr=False,
        description=(
            "queue metrics for the local autoscaler; several nodes comma-separated (a read moves on to a "
            "node that answers); default: from `AMQP_URL`, port 15672 on each node"
        ),
    )
    # Unset: the ScaledObjects `task manifests` writes from the catalogue (those in keda/).
    scaledobjects_dir: str | None = Field(
        None,
        alias="SCALEDOBJECTS_DIR",
        description=(
            "the ScaledObjects the local autoscaler applies; default: those generated from the catalogue "
            "(as in `keda/`)"
        ),
    )
    local_autoscaler: bool = Field(
        True, alias="LOCAL_AUTOSCALER", description="off: a fixed `WORKER_REPLICAS` per model"
    )
    local_push_activation: bool = Field(
        True,
        alias="LOCAL_PUSH_ACTIVATION",
        description="wake a model from zero on the ingress's demand events, not only on a poll",
    )
    local_max_replicas: int | None = Field(
        None,
        ge=1,
        alias="LOCAL_MAX_REPLICAS",
        description=(
            "most replicas per model the local autoscaler runs on this machine; default: cores / "
            "(`MODEL_THREADS` + 1), a core's worth left for the message path"
        ),
    )
    worker_replicas: int = Field(
        1, ge=1, alias="WORKER_REPLICAS", description="replicas per model when `LOCAL_AUTOSCALER` is off"
    )
    autoscaler_metrics_port: Port = Field(
        9101, alias="AUTOSCALER_METRICS_PORT", description="the local autoscaler's Prometheus endpoint"
    )
    worker_metrics_port: Port = Field(
        9102,
        alias="WORKER_METRICS_PORT",
        description="Ray's metrics exporter (the workers' and the dispatcher's series)",
    )
    ray_node_ip: str = Field(
        "127.0.0.1",
        alias="RAY_NODE_IP",
        description=(
            "the address Ray's node takes; loopback keeps Ray off the network on one machine, "
            "and a pod sets its own IP (`status.podIP`): Ray's metrics exporter binds "
            "loopback when the node's address is loopback, where Prometheus cannot scrape it"
        ),
    )
    serve_http_port: Port = Field(
        0,
        alias="SERVE_HTTP_PORT",
        description="Serve's HTTP proxy (the direct path the pipeline bench compares with); 0: off",
    )

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
        if self.max_inflight_body_bytes < self.max_batch_body_bytes:
            raise ValueError(
                f"MAX_INFLIGHT_BODY_BYTES={self.max_inflight_body_bytes} is below "
                f"MAX_BATCH_BODY_BYTES={self.max_batch_body_bytes}; the in-flight budget must hold one "
                "largest batch"
            )
        if is_sentinel_url(self.redis_url):
            try:
                parse_sentinel_url(self.redis_url)
            except ValueError as exc:
                raise ValueError(f"REDIS_URL: {exc}") from None
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
    def object_store(self) -> StoreSettings | None:
        """Where uploads live; None when S3_ENDPOINT_URL is unset."""
        if self.s3_endpoint_url is None:
            return None
        return StoreSettings(
            self.s3_endpoint_url,
            self.s3_bucket,
            self.s3_region,
            self.s3_access_key_id,
            self.s3_secret_access_key,
            public_endpoint_url=self.s3_public_endpoint_url,
        )

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
            tenant_lanes=self.tenant_lanes,
            classic_queue_version=1 if self.classic_queue_version == 1 else 2,
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
