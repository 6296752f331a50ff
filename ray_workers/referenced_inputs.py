"""A job's input named by reference (`input_ref`, an upload in the object store), read
when the job is taken: the ingress checked only that it exists and fits, so here it is
decoded and checked against the model's input schema, as the ingress checks an inline
input. A miss or an input that is not JSON fails the job (permanent); a store that does
not answer sends the job to its retry tiers (transient)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from model_catalogue.catalogue import load_catalogue
from model_catalogue.input_schemas import InputSchemas, ValidationBudgetExceeded
from object_store.store import ObjectStore, ObjectTooLarge, StoreUnavailable
from ray_workers.settings import WorkerSettings

# The schema check's time budget for one referenced input (the ingress's is per request).
VALIDATION_BUDGET_S = 5.0
# Inputs larger than this are decoded and checked in a thread: the loop keeps the batch moving.
OFF_LOOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReadInput:
    value: Any = None
    error: str | None = None
    permanent: bool = False


class ReferencedInputs:
    """Reads referenced inputs for one model's worker; `async with` holds the store open."""

    def __init__(self, model: str, settings: WorkerSettings) -> None:
        self._model = model
        self._max_bytes = settings.upload_max_bytes
        self._store = None if settings.object_store is None else ObjectStore(settings.object_store)
        self._schemas = InputSchemas(
            load_catalogue(Path(settings.model_catalogue)), (model,), VALIDATION_BUDGET_S
        )
        self._open = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ReferencedInputs:
        if self._store is not None:
            await self._open.enter_async_context(self._store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._open.aclose()

    async def read(self, ref: str) -> ReadInput:
        if self._store is None:
            return ReadInput(error=f"input_ref {ref}: this worker has no object store", permanent=False)
        try:
            data = await self._store.read(ref, self._max_bytes)
        except StoreUnavailable as exc:
            return ReadInput(error=f"input_ref {ref}: the object store did not answer: {exc}")
        except ObjectTooLarge as exc:
            return ReadInput(error=f"input_ref {ref}: {exc}", permanent=True)
        if data is None:
            return ReadInput(error=f"input_ref {ref}: the upload is gone", permanent=True)
        if len(data) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self._checked, ref, data)
        return self._checked(ref, data)

    def _checked(self, ref: str, data: bytes) -> ReadInput:
        """The bytes decoded and checked against the model's schema."""
        try:
            value = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            return ReadInput(error=f"invalid input: input_ref {ref} is not JSON: {exc}", permanent=True)
        try:
            problem = self._schemas.problem(self._model, value)
        except ValidationBudgetExceeded:
            return ReadInput(error=f"invalid input: input_ref {ref} is too complex to check", permanent=True)
        if problem is not None:
            pointer, message = problem
            return ReadInput(
                error=(
                    f"invalid input: input_ref {ref} does not match {self._model}'s input schema "
                    f"at {pointer}: {message}"
                ),
                permanent=True,
            )
        return ReadInput(value=value)
