"""`echo`: returns the input unchanged, to measure the pipeline without a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EchoModel:
    name = "echo"

    def prepare(self, raw_input: Any, attempt: int) -> Any:
        return raw_input

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return list(inputs)
