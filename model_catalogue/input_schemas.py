"""The served models' input schemas, compiled once, checked at submit within a budget.

jsonschema's own `oneOf` and `anyOf` collect every error of every branch before they
decide, and `best_match` then walks them all: one 1 MiB `{"texts": [0, 0, ...]}` made
half a million errors (16 s and 1.8 GB here). The validator here is Draft 2020-12 with
two changes:
- `oneOf` and `anyOf` take one error per branch (the first), which is all they need to
  decide, so a bad array costs its first bad item, not every item;
- every keyword checks a deadline before it runs: a schema whose cost grows with the
  input (`uniqueItems`, `unevaluatedProperties`, deep `$ref`s) ends in
  `ValidationBudgetExceeded` instead of holding the process.
Messages are cut to MAX_MESSAGE_CHARS (start and end): jsonschema puts the instance's
repr in them.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from model_catalogue.catalogue import Catalogue

MAX_MESSAGE_CHARS = 300
_deadline = contextvars.ContextVar("input_validation_deadline", default=math.inf)


class ValidationBudgetExceeded(Exception):
    """Checking the input took longer than its budget (INPUT_VALIDATION_BUDGET_MS)."""


def _first_errors(validator: Any, branches: list[Any], instance: Any) -> Iterator[ValidationError | None]:
    """Each branch's first error, or None where the instance is valid under it."""
    for index, subschema in enumerate(branches):
        yield next(iter(validator.descend(instance, subschema, schema_path=index)), None)


def _any_of(validator: Any, branches: list[Any], instance: Any, schema: Any) -> Iterator[ValidationError]:
    errors = []
    for error in _first_errors(validator, branches, instance):
        if error is None:
            return
        errors.append(error)
    yield ValidationError(f"not valid under any of the {len(branches)} schemas of anyOf", context=errors)


def _one_of(validator: Any, branches: list[Any], instance: Any, schema: Any) -> Iterator[ValidationError]:
    errors: list[ValidationError] = []
    valid: list[int] = []
    for index, error in enumerate(_first_errors(validator, branches, instance)):
        if error is None:
            valid.append(index)
        else:
            errors.append(error)
    if not valid:
        yield ValidationError(f"not valid under any of the {len(branches)} schemas of oneOf", context=errors)
    elif len(valid) > 1:
        yield ValidationError(f"valid under more than one schema of oneOf (branches {valid})")


def _within_deadline(keyword: Callable[..., Any]) -> Callable[..., Any]:
    def checked(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if time.monotonic() > _deadline.get():
            raise ValidationBudgetExceeded
        return keyword(validator, value, instance, schema)

    return checked


_KEYWORDS = {
    **jsonschema.Draft202012Validator.VALIDATORS,
    "anyOf": _any_of,
    "oneOf": _one_of,
}
BudgetedValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    validators={name: _within_deadline(keyword) for name, keyword in _KEYWORDS.items()},
)


class InputSchemas:
    """The served models' input schemas, for the ingress's check at submit."""

    def __init__(self, catalogue: Catalogue, models: tuple[str, ...], budget_s: float = 0.25) -> None:
        self._validators = {model: BudgetedValidator(catalogue.entry(model).input_schema) for model in models}
        self._budget_s = budget_s

    def problem(self, model: str, value: Any, deadline: float = math.inf) -> tuple[str, str] | None:
        """The first violation, as (JSON pointer from the request body, message), or None;
        ValidationBudgetExceeded past the budget, or past `deadline` (monotonic seconds)
        when that comes first: a batch's jobs share one."""
        token = _deadline.set(min(deadline, time.monotonic() + self._budget_s))
        try:
            error = next(iter(self._validators[model].iter_errors(value)), None)
        finally:
            _deadline.reset(token)
        if error is None:
            return None
        best = jsonschema.exceptions.best_match([error])
        parts = "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in best.absolute_path)
        return f"/input{parts}", _shortened(best.message)


def _shortened(message: str) -> str:
    """The message's start and end (jsonschema puts the verdict after the instance's repr)."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    half = (MAX_MESSAGE_CHARS - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"
