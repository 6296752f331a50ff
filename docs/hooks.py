"""What the docs build generates from the code, so those pages cannot drift from it: the
configuration reference (from `settings.environment.Environment`, its fields' defaults,
rules and descriptions), the OpenAPI document the HTTP API page renders (from
`ingress.openapi`, for the default models) and the charts of measured runs.

mkdocs loads this file as a hook module (`docs/mkdocs.yml`); the tests import it as
`docs.hooks`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ingress.openapi import openapi_document
from model_catalogue.catalogue import load_catalogue
from settings.environment import DEFAULT_MODELS, PER_MODEL_PREFIXES, SECRET_VARIABLES, Environment

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_MARKER = "{{ settings_table }}"
OPENAPI_FILE = "openapi.json"
# Measured runs whose charts the performance page shows, published at the same paths.
CHART_FOLDERS = ("bench/results", "loadgen/reports")
_BOUNDS = (
    ("minimum", ">="),
    ("exclusiveMinimum", ">"),
    ("maximum", "<="),
    ("exclusiveMaximum", "<"),
)


def variable_name(field_name: str, field: FieldInfo) -> str:
    """The variable a field reads: its alias, or `<PREFIX><MODEL>` for a per-model one."""
    for prefix, per_model_field in PER_MODEL_PREFIXES.items():
        if per_model_field == field_name:
            return f"{prefix}<MODEL>"
    if field.alias is None:
        raise ValueError(f"Environment.{field_name} reads no variable: give it an alias")
    return field.alias


def _default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(unset)" if field.default_factory is dict else "(computed: see meaning)"
    value = field.default
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return f"`{','.join(_number(item) for item in value)}`" if value else "(empty)"
    if isinstance(value, str):
        if value.startswith(str(ROOT)):
            value = str(Path(value).relative_to(ROOT))
        return f"`{value}`" if value else "(empty)"
    return f"`{_number(value)}`"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _accepts(schema: dict[str, Any]) -> str:
    """A field's rule in words, from its JSON schema (type, choices, bounds)."""
    options = [option for option in schema.get("anyOf", [schema]) if option.get("type") != "null"]
    words = [_accepts_one(option) for option in options]
    return " or ".join(words)


def _accepts_one(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " / ".join(f"`{choice}`" for choice in schema["enum"])
    kind = schema.get("type", "")
    if kind == "array":
        item = _accepts_one(schema.get("items", {}))
        return f"comma-separated: {item}" + (", at least one" if schema.get("minLength") else "")
    if kind == "object":
        return _accepts_one(schema.get("additionalProperties", {}))
    names = {"integer": "integer", "number": "number", "boolean": "true / false", "string": "text"}
    bounds = [f"{sign} {_number(schema[key])}" for key, sign in _BOUNDS if key in schema]
    return ", ".join([names.get(kind, kind or "text"), *bounds])


def settings_table(settings: type[BaseModel] = Environment) -> str:
    """Every variable the settings class reads, in declaration order, as a Markdown table."""
    properties = settings.model_json_schema(by_alias=True)["properties"]
    rows = ["| variable | default | accepts | meaning |", "|---|---|---|---|"]
    for field_name, field in settings.model_fields.items():
        if not field.description:
            raise ValueError(
                f"{settings.__name__}.{field_name} has no description for the configuration page"
            )
        name = variable_name(field_name, field)
        schema = properties[field.alias or field_name]
        secret = " (a secret: never logged or echoed)" if name in SECRET_VARIABLES else ""
        meaning = field.description.replace("|", "\\|") + secret
        rows.append(f"| `{name}` | {_default_text(field)} | {_accepts(schema)} | {meaning} |")
    return "\n".join(rows)


def openapi_json() -> str:
    """The OpenAPI document an ingress serving the default models answers at /openapi.json."""
    return json.dumps(openapi_document(DEFAULT_MODELS, load_catalogue()), indent=2)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, OPENAPI_FILE, content=openapi_json()))
    for folder in CHART_FOLDERS:
        for chart in sorted((ROOT / folder).glob("*.png")):
            files.append(File.generated(config, f"{folder}/{chart.name}", abs_src_path=str(chart)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return markdown.replace(SETTINGS_MARKER, settings_table())
