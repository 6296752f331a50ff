"""The model workers' settings, read once from the environment at start. No webhook
secret: a model replica never signs anything (`callbacks.settings` has it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from contract.config import (
    DEFAULT_AMQP_URL,
    env_flag,
    env_float,
    env_int,
    model_env_suffix,
    served_models,
    topology_from_env,
)
from contract.topology import Topology


@dataclass(frozen=True)
class WorkerSettings:
    amqp_url: str = field(default=DEFAULT_AMQP_URL, repr=False)
    models: tuple[str, ...] = ("echo", "embed-minilm")
    topology: Topology = field(default_factory=Topology)
    batch_max_size: int = 128
    batch_max_wait_s: float = 0.005
    # Adaptive batching: the controller keeps each batch's model time under the target.
    batch_adaptive: bool = True
    batch_latency_target_s: float = 0.2
    batch_latency_target_by_model: Mapping[str, float] = field(default_factory=dict)
    # Model breaker: consecutive failed batches that open it, and its cool-down.
    breaker_failure_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    drain_timeout_s: float = 30.0
    # Intra-op threads of a model replica (OMP_NUM_THREADS); default: the machine's cores.
    model_threads: int = field(default_factory=lambda: os.cpu_count() or 1)

    def latency_target_s(self, model: str) -> float:
        return self.batch_latency_target_by_model.get(model, self.batch_latency_target_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        models = served_models(env)
        return cls(
            amqp_url=env.get("AMQP_URL", DEFAULT_AMQP_URL),
            models=models,
            topology=topology_from_env(env, models),
            batch_max_size=env_int(env, "BATCH_MAX_SIZE", 128, minimum=1),
            batch_max_wait_s=env_float(env, "BATCH_MAX_WAIT_MS", 5.0) / 1000,
            batch_adaptive=env_flag(env, "BATCH_ADAPTIVE", default=True),
            batch_latency_target_s=env_float(env, "BATCH_LATENCY_TARGET_MS", 200.0, minimum=1.0) / 1000,
            batch_latency_target_by_model={
                model: env_float(env, f"BATCH_LATENCY_TARGET_MS_{model_env_suffix(model)}", 0.0) / 1000
                for model in models
                if env.get(f"BATCH_LATENCY_TARGET_MS_{model_env_suffix(model)}")
            },
            breaker_failure_threshold=env_int(env, "BREAKER_FAILURE_THRESHOLD", 5, minimum=1),
            breaker_cooldown_s=env_float(env, "BREAKER_COOLDOWN_S", 30.0),
            drain_timeout_s=env_float(env, "DRAIN_TIMEOUT_S", 30.0),
            model_threads=env_int(env, "MODEL_THREADS", os.cpu_count() or 1, minimum=1),
        )
