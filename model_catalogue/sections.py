"""How a model runs, from its catalogue entry: the resources a replica gets, how its jobs
are batched, how its replicas scale, how its jobs are retried and how long they may wait.

Each section is optional and each field has the default the platform used before the
catalogue had sections, so an entry names only what differs. The local stack, the
workers, the ingress and `task manifests` (KEDA ScaledObjects and worker Deployments)
all read these values, so a model's behaviour is written once, here in models.yaml.

Units follow the environment's: milliseconds where the variable says `_ms`
(`BATCH_MAX_WAIT_MS`), seconds where it says `_s`. An environment variable that is set
still wins over the catalogue for every model (see `settings.environment`): operators keep
their knobs.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_STRICT = ConfigDict(frozen=True, extra="forbid", strict=True)
# Kubernetes memory quantities in binary units, which is what a model's footprint is measured in.
MemoryQuantity = Annotated[str, Field(pattern=r"^[1-9][0-9]*(Mi|Gi)$")]
Number = Annotated[float, Field(strict=False)]


class Resources(BaseModel):
    """What one replica needs: a pod's requests in a cluster (GPUs also as its limit).

    `processes_per_gpu` worker processes share a one-GPU replica, each with its own event
    loop and GIL: on a GPU one process's message path, not the model, is the limit
    (bench/minilm_device.py: on an H200, embed-minilm's one-text jobs ran at 3.2k/s with
    one process and 19.7k/s with eight). `cpus` and `memory` are the whole replica's.
    """

    model_config = _STRICT
    cpus: Annotated[Number, Field(gt=0, le=256)] = 1.0
    memory: MemoryQuantity = "2Gi"
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    processes_per_gpu: Annotated[int, Field(ge=1, le=32)] = 1

    @model_validator(mode="after")
    def _shared_gpu_is_one(self) -> Resources:
        if self.processes_per_gpu > 1 and self.gpus != 1:
            raise ValueError(
                f"processes_per_gpu {self.processes_per_gpu} needs gpus: 1 (it has {self.gpus}): "
                "the processes share one GPU"
            )
        return self


class Batching(BaseModel):
    """The batch engine's knobs (ray_workers/batch_controller.py)."""

    model_config = _STRICT
    max_size: Annotated[int, Field(ge=1, le=4096)] = 128
    max_wait_ms: Annotated[Number, Field(ge=0, le=10_000)] = 5.0
    adaptive: bool = True
    latency_target_ms: Annotated[Number, Field(ge=1, le=600_000)] = 200.0

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def latency_target_s(self) -> float:
        return self.latency_target_ms / 1000


class Scaling(BaseModel):
    """KEDA's (and the local autoscaler's) rules for the model's replicas."""

    model_config = _STRICT
    min_replicas: Annotated[int, Field(ge=0)] = 0
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 4
    # Jobs queued or in flight per replica: size it to a few seconds of one replica's work.
    backlog_per_replica: Annotated[int, Field(ge=1)] = 200
    # Idle time before the last replica goes; longer than the worst batch plus the drain.
    cooldown_s: Annotated[int, Field(ge=0)] = 120
    polling_interval_s: Annotated[int, Field(ge=1, le=300)] = 5

    @model_validator(mode="after")
    def _min_within_max(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self


class Jobs(BaseModel):
    """A job's life: the waits before its retries, and its deadline when the caller sets none."""

    model_config = _STRICT
    # None: the platform's RETRY_DELAYS_S.
    retry_delays_s: (
        Annotated[tuple[Annotated[Number, Field(gt=0)], ...], Field(min_length=1, strict=False)] | None
    ) = None
    # None: no deadline unless the request's ttl_s sets one.
    default_ttl_s: Annotated[Number, Field(gt=0)] | None = None


S = TypeVar("S", bound=BaseModel)


class SectionError(ValueError):
    """A section of an entry is unusable; the message names the field and the value."""


def parse_section(section: str, kind: type[S], raw: Any) -> S:
    """`raw` (the YAML mapping, or None for the defaults) as `kind`, or a SectionError
    saying `section.field=value: what it accepts`."""
    if raw is None:
        return kind()
    if not isinstance(raw, dict):
        raise SectionError(f"{section} must be a mapping of {sorted(kind.model_fields)}, got {raw!r}")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field; expected one of {sorted(kind.model_fields)}"
        if not field:  # a rule across fields: its message names them
            raise SectionError(f"{section}: {message}") from None
        value = raw.get(field.split(".")[0], "")
        raise SectionError(f"{section}.{field}={value!r}: {message}") from None
