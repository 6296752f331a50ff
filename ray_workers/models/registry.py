"""Model names to constructors; loading happens once per replica."""

from __future__ import annotations

from ray_workers.models.base import Model


def load_model(name: str) -> Model:
    if name == "echo":
        from ray_workers.models.echo import EchoModel

        return EchoModel()
    if name == "embed-minilm":
        from ray_workers.models.minilm import MiniLMModel

        return MiniLMModel()
    if name == "synthetic":
        from ray_workers.models.synthetic import SyntheticModel

        return SyntheticModel()
    raise ValueError(f"unknown model {name!r}; expected echo, embed-minilm or synthetic")
