"""The model interface: load once, validate each input, predict on a batch.

`prepare` runs per job so one bad input fails only its own job; `predict` runs on the
whole batch and must return one output per input, in order: a plain `def predict` runs
on a thread, off the event loop; an `async def predict` is awaited on the loop (for a
model that calls out, e.g. to a GPU server). An optional `warm_up()` runs once per
replica after loading, before the replica takes any job (compile, allocate, load
caches: the first job should not pay for it). The class is constructed with no
arguments, once per replica, and picks its device itself from what it can see: Ray makes
visible exactly the GPUs the replica reserved (its catalogue entry's `resources.gpus`;
none without them), so "CUDA if available" is the device it got.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, cast

import msgspec

# What encoding a model's output as JSON may raise (an unsupported type such as
# numpy.float32, nesting deeper than the encoder's limit).
UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)


class ModelError(Exception):
    """Base of what a model raises."""


class InvalidInput(ModelError):
    """This input can never succeed with this model (permanent)."""


class ModelFailure(ModelError):
    """The model failed for reasons other than its input (transient: a retry may succeed)."""


class Model(Protocol):
    name: str

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        """Validate and normalise one job's input; raise InvalidInput when it cannot work.

        `attempt` (1 on first delivery) is for models whose behaviour depends on it.
        """
        ...

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        """Outputs for a batch of prepared inputs, one per input, in order."""
        ...


async def predictions(model: Model, inputs: Sequence[Any]) -> list[Any]:
    """The model's outputs for a batch: a plain `predict` on a thread, off the event loop,
    an async one awaited on it; ModelError unless there is one output per input."""
    predict = model.predict
    if inspect.iscoroutinefunction(predict):
        outputs = await cast(Awaitable[list[Any]], predict(inputs))
    else:
        outputs = await asyncio.to_thread(predict, inputs)
    if len(outputs) != len(inputs):
        raise ModelError(f"model returned {len(outputs)} outputs for {len(inputs)} inputs")
    return outputs
