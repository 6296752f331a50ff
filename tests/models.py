"""Test doubles for the model interface (never for the broker): a model that can be
switched between failing and healthy, and records every batch it was asked to run."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ray_workers.models.base import ModelFailure


@dataclass(frozen=True)
class RecordedBatch:
    attempts: tuple[int, ...]
    at_monotonic_s: float


@dataclass(frozen=True)
class _Item:
    value: Any
    attempt: int


class RecordingModel:
    """Echoes its input; fails every batch while `healthy` is False, or while a job's
    attempt is below `fail_until_attempt`."""

    name = "echo"

    def __init__(self, healthy: bool = True, fail_until_attempt: int = 0) -> None:
        self.healthy = healthy
        self.fail_until_attempt = fail_until_attempt
        self.batches: list[RecordedBatch] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.batches)

    def prepare(self, raw_input: Any, attempt: int) -> _Item:
        return _Item(raw_input, attempt)

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        with self._lock:
            self.batches.append(RecordedBatch(tuple(i.attempt for i in inputs), time.monotonic()))
        if not self.healthy:
            raise ModelFailure("model is down (test switch)")
        if any(item.attempt < self.fail_until_attempt for item in inputs):
            raise ModelFailure(f"fails until attempt {self.fail_until_attempt}")
        return [item.value for item in inputs]


class LinearLatencyModel:
    """Echo whose batch takes `base_s + per_item_s * size`, like a real batched model."""

    name = "echo"

    def __init__(self, base_s: float, per_item_s: float) -> None:
        self.base_s, self.per_item_s = base_s, per_item_s

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        time.sleep(self.base_s + self.per_item_s * len(inputs))
        return list(inputs)


class ShortChangingModel(LinearLatencyModel):
    """Returns one output fewer than it was given: a broken model contract."""

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return list(inputs)[:-1]


class PoisonModel:
    """Echo that fails a whole batch, at once, when any input in it is "poison": one
    caller's bad input in a batch of others' good ones."""

    name = "echo"

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        with self._lock:
            self.batch_sizes.append(len(inputs))
        if "poison" in inputs:
            raise ModelFailure("cannot digest this batch")
        return list(inputs)


class GatedModel:
    """Echo whose first batch waits until `gate` is set; records every input it ran."""

    name = "echo"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.batches: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    @property
    def ran(self) -> list[Any]:
        with self._lock:
            return [value for batch in self.batches for value in batch]

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        with self._lock:
            first = not self.batches
            self.batches.append(tuple(inputs))
        if first:
            self.gate.wait(30)
        return list(inputs)


class ContestedModel:
    """Echo, except for the input "contested": while it runs, another replica records the
    job as succeeded (written straight to the job's record in Redis), and here it fails."""

    name = "echo"

    def __init__(self, redis_url: str, key_prefix: str) -> None:
        self._redis = redis.Redis.from_url(redis_url)
        self._key_prefix = key_prefix
        self.contested_job_id = ""

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        if "contested" in inputs:
            self._redis.hset(
                f"{self._key_prefix}inferq:job:{self.contested_job_id}", mapping={"status": "succeeded"}
            )
            raise ModelFailure("failed here, after another copy succeeded")
        return list(inputs)


class UnencodableModel:
    """Echo whose output for "complex" is a complex number and for "deep" a list nested past
    the encoder's limit: outputs no callback or record can carry."""

    name = "echo"

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return [self._output(value) for value in inputs]

    @staticmethod
    def _output(value: Any) -> Any:
        if value == "complex":
            return 1j
        if value == "deep":
            nested: list[Any] = []
            for _ in range(5000):
                nested = [nested]
            return nested
        return value
