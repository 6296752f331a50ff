"""The model catalogue (`models.yaml`): which models exist, where their code is, and what
a job's input must look like. The one list the ingress, the workers and the settings
agree on.

Read once at start (`load_catalogue`), validated whole: a bad entry stops the process
with a `CatalogueError` naming the file, the model and the field. `MODELS` then picks
which entries run; entries marked `test_only` run only with ENABLE_TEST_MODELS=1.

Installed packages add models through the entry-point group `inferq.models` (name =
model name, value = `package.module:Class`): such a model needs no catalogue entry (its
input schema is then `{}`, any JSON), and a catalogue entry of the same name may leave
out `class` to use it while giving the schema and description.

Each entry may also say how the model runs (`resources`, `batching`, `scaling`, `jobs`:
`model_catalogue.sections`); what it leaves out takes the platform's defaults.

Checked here: the entry's fields, the class path's shape (`package.module:Class`) and
that each input schema is a valid JSON Schema (2020-12). Importing the class (and
checking it has `prepare` and `predict`) is `model_class`'s job, done by the processes
that run models: the ingress never imports model code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from model_catalogue.sections import Batching, Jobs, Resources, Scaling, SectionError, parse_section

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "models.yaml"
_CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_FIELDS = {"class", "description", "input_schema", "test_only", "resources", "batching", "scaling", "jobs"}


class CatalogueError(ValueError):
    """The catalogue, or one of its models, is unusable; the message says where."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    class_path: str
    description: str
    input_schema: dict[str, Any]
    test_only: bool = False
    resources: Resources = field(default_factory=Resources)
    batching: Batching = field(default_factory=Batching)
    scaling: Scaling = field(default_factory=Scaling)
    jobs: Jobs = field(default_factory=Jobs)


@dataclass(frozen=True)
class Catalogue:
    source: str
    entries: dict[str, ModelEntry]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    @property
    def test_only(self) -> tuple[str, ...]:
        return tuple(name for name, entry in self.entries.items() if entry.test_only)

    def entry(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise CatalogueError(f"{self.source}: no model {name!r}; the catalogue has {list(self.entries)}")
        return self.entries[name]


ENTRY_POINT_GROUP = "inferq.models"


def installed_models() -> dict[str, str]:
    """Models that installed packages declare: name -> `package.module:Class`."""
    return {point.name: point.value for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


@functools.lru_cache(maxsize=8)
def load_catalogue(path: Path = DEFAULT_CATALOGUE) -> Catalogue:
    """Parse and validate the catalogue file, plus the models installed packages declare
    (cached: every process reads it once)."""
    source = str(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CatalogueError(f"{source}: cannot read the model catalogue: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogueError(f"{source}: not valid YAML: {exc}") from exc
    models = document.get("models") if isinstance(document, dict) else None
    if not isinstance(models, dict) or not models:
        raise CatalogueError(f"{source}: expected a mapping `models:` of at least one model")
    installed = installed_models()
    entries = {name: _entry(source, name, fields, installed) for name, fields in models.items()}
    for name, class_path in installed.items():
        if name not in entries:
            entries[name] = _entry(f"entry point {ENTRY_POINT_GROUP}", name, {"class": class_path}, {})
    return Catalogue(source, entries)


def _entry(source: str, name: object, fields: object, installed: dict[str, str]) -> ModelEntry:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CatalogueError(f"{source}: model name {name!r} must be lowercase letters, digits and '-'")
    where = f"{source}: model {name!r}"
    if not isinstance(fields, dict):
        raise CatalogueError(f"{where}: expected a mapping of {sorted(_FIELDS)}")
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise CatalogueError(f"{where}: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
    class_path = fields.get("class", installed.get(name))
    if class_path is None:
        raise CatalogueError(
            f"{where}: no class, and no installed package declares the entry point {ENTRY_POINT_GROUP}:{name}"
        )
    if not isinstance(class_path, str) or not _CLASS_PATH.match(class_path):
        raise CatalogueError(f"{where}: class={class_path!r}; expected `package.module:Class`")
    schema = fields.get("input_schema", {})
    if not isinstance(schema, dict):
        raise CatalogueError(f"{where}: input_schema must be a JSON Schema object, got {schema!r}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise CatalogueError(f"{where}: input_schema is not a valid JSON Schema: {exc.message}") from exc
    test_only = fields.get("test_only", False)
    if not isinstance(test_only, bool):
        raise CatalogueError(f"{where}: test_only={test_only!r}; expected true or false")
    try:
        return ModelEntry(
            name,
            class_path,
            str(fields.get("description", "")),
            schema,
            test_only,
            resources=parse_section("resources", Resources, fields.get("resources")),
            batching=parse_section("batching", Batching, fields.get("batching")),
            scaling=parse_section("scaling", Scaling, fields.get("scaling")),
            jobs=parse_section("jobs", Jobs, fields.get("jobs")),
        )
    except SectionError as exc:
        raise CatalogueError(f"{where}: {exc}") from None


def model_class(entry: ModelEntry) -> type:
    """Import the entry's class and check it is a model (has `prepare` and `predict`)."""
    module_name, _, class_name = entry.class_path.partition(":")
    where = f"model {entry.name!r}: class={entry.class_path!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CatalogueError(f"{where}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise CatalogueError(f"{where}: {module_name} has no class {class_name}")
    missing = [method for method in ("prepare", "predict") if not callable(getattr(cls, method, None))]
    if missing:
        raise CatalogueError(
            f"{where}: the class has no {' or '.join(missing)} (the interface: ray_workers/models/base.py)"
        )
    return cls
