"""Model names to instances, through the catalogue (`models.yaml`); loading happens once
per replica."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from contract.model_catalogue import DEFAULT_CATALOGUE, load_catalogue, model_class
from ray_workers.models.base import Model


def load_model(name: str, catalogue_path: str = str(DEFAULT_CATALOGUE)) -> Model:
    """The catalogue's class for `name`, instantiated; CatalogueError names what is wrong."""
    entry = load_catalogue(Path(catalogue_path)).entry(name)
    model = cast(Model, model_class(entry)())
    if getattr(model, "name", None) != name:
        model.name = name  # the catalogue's name is the one the queues and callbacks use
    return model
