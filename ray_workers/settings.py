"""The model workers' settings, read once from the environment at start. No webhook
secret: a model replica never signs anything (`callbacks.settings` has it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from job_records.store import DEFAULT_RECORD_OUTPUT_MAX_BYTES
from model_catalogue.catalogue import DEFAULT_CATALOGUE
from model_catalogue.sections import Batching
from object_store.store import StoreSettings
from policies.callback_guard import AllowList
from settings.environment import DEFAULT_AMQP_URL, Environment, default_model_threads
from wire.topology import Topology


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    models: tuple[str, ...] = ("echo", "embed-minilm")
    # Where each model's class is found (models.yaml).
    model_catalogue: str = str(DEFAULT_CATALOGUE)
    topology: Topology = field(default_factory=Topology)
    # Each served model's batching (its catalogue section and the BATCH_* overrides);
    # `batching` for a model without one. Adaptive: the controller keeps each batch's
    # model time under the latency target.
    batching: Batching = field(default_factory=Batching)
    batching_by_model: Mapping[str, Batching] = field(default_factory=dict)
    # Model breaker: consecutive failed batches that open it, and its cool-down.
    breaker_failure_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    drain_timeout_s: float = 30.0
    # Threads of a model replica (OMP_NUM_THREADS); default: the machine's cores.
    model_threads: int = field(default_factory=default_model_threads)
    # GPUs Ray reserves for each replica (a pod's WORKER_NUM_GPUS).
    num_gpus: float = 0.0
    # Worker processes sharing a pod's GPU (WORKER_PROCESSES_PER_GPU).
    processes_per_gpu: int = 1
    # Job records (first terminal status per job wins, cancel); None runs without them.
    redis_url: str | None = field(default=None, repr=False)
    result_ttl_s: int = 24 * 3600
    record_output_max_bytes: int = DEFAULT_RECORD_OUTPUT_MAX_BYTES
    # Where jobs' `input_ref` uploads are read from; None: such a job fails as invalid.
    object_store: StoreSettings | None = field(default=None, repr=False)
    upload_max_bytes: int = 1024**3
    # Jobs' `input_url`: fetched through the callback-URL guard, with its allow-list.
    input_allow: AllowList = field(default_factory=AllowList)
    input_url_timeout_s: float = 120.0
    dns_timeout_s: float = 3.0
    # Outputs larger than this go to the object store, by reference (where there is one).
    output_inline_max_bytes: int = 256 * 1024
    # Bytes of job bodies in one batch, and prefetched by a classic-queue consumer.
    batch_max_bytes: int = 8 * 1024 * 1024
    prefetch_max_bytes: int = 32 * 1024 * 1024
    # A batch after one whose model time was under this is marked running with its endings,
    # after it ran (one Redis round trip, not two; QUICK_BATCH_MS).
    quick_batch_s: float = 0.02

    def pod_processes(self) -> tuple[int, float]:
        """Serve replicas in one pod and the GPUs each reserves: a pod with GPUs runs
        `processes_per_gpu` of them on a share of its GPU each; a pod without, one."""
        if self.num_gpus <= 0:
            return 1, 0.0
        return self.processes_per_gpu, self.num_gpus / self.processes_per_gpu

    def batching_for(self, model: str) -> Batching:
        return self.batching_by_model.get(model, self.batching)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        read = Environment.read(env)
        return cls(
            amqp_url=read.amqp_url,
            models=read.served_models,
            topology=read.topology(),
            batching_by_model={model: read.batching(model) for model in read.served_models},
            breaker_failure_threshold=read.breaker_failure_threshold,
            breaker_cooldown_s=read.breaker_cooldown_s,
            drain_timeout_s=read.drain_timeout_s,
            model_threads=read.model_threads,
            model_catalogue=read.model_catalogue,
            num_gpus=read.worker_num_gpus,
            processes_per_gpu=read.worker_processes_per_gpu,
            redis_url=read.records_url,
            result_ttl_s=read.result_ttl_s,
            record_output_max_bytes=read.record_output_max_bytes,
            batch_max_bytes=read.worker_batch_max_bytes,
            prefetch_max_bytes=read.worker_prefetch_max_bytes,
            quick_batch_s=read.quick_batch_ms / 1000,
            object_store=read.object_store,
            upload_max_bytes=read.upload_max_bytes,
            input_allow=AllowList.parse(read.callback_allow_hosts),
            input_url_timeout_s=read.input_url_timeout_s,
            dns_timeout_s=read.dns_timeout_s,
            output_inline_max_bytes=read.output_inline_max_bytes,
        )
