"""`synthetic` (test models only): sleeps and fails on demand, for latency and failure tests.

Input: {"sleep_ms": n, "fail_until_attempt": k, "fail_permanently": bool}. A job with
`fail_until_attempt: k` fails transiently while its attempt is below k; a batch fails
as a whole when any of its jobs fails, as a real batched model would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ray_workers.models.base import InvalidInput, ModelFailure


class SyntheticInput(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    sleep_ms: float = 0.0
    fail_until_attempt: int = 0
    fail_permanently: bool = False


class SyntheticJob(msgspec.Struct, frozen=True):
    spec: SyntheticInput
    attempt: int


class SyntheticModel:
    name = "synthetic"

    def prepare(self, raw_input: Any, attempt: int) -> SyntheticJob:
        try:
            spec = msgspec.convert(raw_input or {}, SyntheticInput)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"synthetic input is invalid: {exc}") from exc
        if not 0 <= spec.sleep_ms <= 60_000:
            raise InvalidInput(f"sleep_ms={spec.sleep_ms} is outside 0..60000")
        if spec.fail_permanently:
            raise InvalidInput("fail_permanently was requested")
        return SyntheticJob(spec, attempt)

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        # A batch sleeps as long as its slowest job.
        time.sleep(max((job.spec.sleep_ms for job in inputs), default=0.0) / 1000)
        for job in inputs:
            if job.attempt < job.spec.fail_until_attempt:
                raise ModelFailure(
                    f"synthetic failure on attempt {job.attempt} "
                    f"(fails until attempt {job.spec.fail_until_attempt})"
                )
        return [{"slept_ms": job.spec.sleep_ms, "attempt": job.attempt} for job in inputs]
