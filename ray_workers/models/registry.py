"""Model names to instances, through the catalogue (`models.yaml`); loading (and the
model's optional `warm_up`) happens once per replica, before it takes any job."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from model_catalogue.catalogue import DEFAULT_CATALOGUE, load_catalogue, model_class
from ray_workers.models.base import Model


def load_model(name: str, catalogue_path: str = str(DEFAULT_CATALOGUE)) -> Model:
    """The catalogue's class for `name`, instantiated; CatalogueError names what is wrong."""
    entry = load_catalogue(Path(catalogue_path)).entry(name)
    model = cast(Model, model_class(entry)())
    if getattr(model, "name", None) != name:
        model.name = name  # the catalogue's name is the one the queues and callbacks use
    warm_up = getattr(model, "warm_up", None)
    if callable(warm_up):
        warm_up()
    return model
