"""Payloads by reference, in a worker: inputs read from the object store or fetched from
a URL, large outputs written to the store.

A job's input named by reference (`input_ref`, an upload; or `input_url`, fetched through
the callback-URL guard by `ray_workers.input_fetch`) is read when the job is taken:
the ingress checked only that it exists and fits, so here it is decoded and checked
against the model's input schema, as the ingress checks an inline input. A miss or an
input that is not JSON fails the job (permanent). An output over OUTPUT_INLINE_MAX_BYTES
is written to `outputs/<job id>` and travels as a presigned GET that expires with the
job's record. A store that does not answer, either way, sends the job to its retry tiers
(transient)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from model_catalogue.catalogue import load_catalogue
from model_catalogue.input_schemas import InputSchemas, ValidationBudgetExceeded
from object_store.store import ObjectStore, ObjectTooLarge, StoreUnavailable
from policies.callback_guard import SystemResolver
from ray_workers.input_fetch import InputFetcher
from ray_workers.settings import WorkerSettings
from wire.envelope import Job, OutputRef

# The schema check's time budget for one referenced input (the ingress's is per request).
VALIDATION_BUDGET_S = 5.0
MAX_PRESIGNED_S = 7 * 24 * 3600
# Inputs larger than this are decoded and checked in a thread: the loop keeps the batch moving.
OFF_LOOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class ReadInput:
    value: Any = None
    error: str | None = None
    permanent: bool = False


class PayloadReferences:
    """One model's worker's reads and writes; `async with` holds the store open."""

    def __init__(self, model: str, settings: WorkerSettings) -> None:
        self._model = model
        self._max_bytes = settings.upload_max_bytes
        self._inline_max_bytes = settings.output_inline_max_bytes
        # A presigned URL lives at most 7 days (SigV4); a record lives RESULT_TTL_S.
        self._output_url_ttl_s = min(settings.result_ttl_s, MAX_PRESIGNED_S)
        self._store = None if settings.object_store is None else ObjectStore(settings.object_store)
        self._schemas = InputSchemas(
            load_catalogue(Path(settings.model_catalogue)), (model,), VALIDATION_BUDGET_S
        )
        self._resolver = SystemResolver(timeout_s=settings.dns_timeout_s)
        self._fetcher = InputFetcher(
            settings.input_allow, self._resolver, settings.upload_max_bytes, settings.input_url_timeout_s
        )
        self._open = contextlib.AsyncExitStack()

    async def __aenter__(self) -> PayloadReferences:
        self._open.push_async_callback(self._fetcher.close)
        self._open.callback(self._resolver.close)
        if self._store is not None:
            await self._open.enter_async_context(self._store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._open.aclose()

    async def read_job_input(self, job: Job) -> ReadInput:
        """The input the job names, by `input_url` or by `input_ref`."""
        if job.input_url is not None:
            return await self._fetch_input(job.input_url)
        return await self._read_input(job.input_ref or "")

    async def _fetch_input(self, url: str) -> ReadInput:
        fetched = await self._fetcher.fetch(url)
        if fetched.data is None:
            return ReadInput(error=fetched.error, permanent=fetched.permanent)
        return await self._decoded(f"input_url {url}", fetched.data)

    async def _read_input(self, ref: str) -> ReadInput:
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
        return await self._decoded(f"input_ref {ref}", data)

    async def _decoded(self, named: str, data: bytes | bytearray) -> ReadInput:
        if len(data) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self._checked, named, data)
        return self._checked(named, data)

    def _checked(self, named: str, data: bytes | bytearray) -> ReadInput:
        """The bytes decoded and checked against the model's schema."""
        try:
            value = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            return ReadInput(error=f"invalid input: {named} is not JSON: {exc}", permanent=True)
        try:
            problem = self._schemas.problem(self._model, value)
        except ValidationBudgetExceeded:
            return ReadInput(error=f"invalid input: {named} is too complex to check", permanent=True)
        if problem is not None:
            pointer, message = problem
            return ReadInput(
                error=(
                    f"invalid input: {named} does not match {self._model}'s input schema "
                    f"at {pointer}: {message}"
                ),
                permanent=True,
            )
        return ReadInput(value=value)

    @property
    def stores_outputs(self) -> bool:
        return self._store is not None

    def by_reference(self, encoded: bytes) -> bool:
        """Whether an output this large goes to the store (only where there is one)."""
        return self._store is not None and len(encoded) > self._inline_max_bytes

    async def store_output(self, job_id: str, encoded: bytes) -> OutputRef:
        """The output written to the store; StoreUnavailable when it cannot be."""
        assert self._store is not None, "by_reference said the output stays inline"
        key = f"outputs/{job_id}"
        await self._store.put(key, encoded)
        url = await self._store.presigned_get(key, self._output_url_ttl_s)
        return OutputRef(url=url, size=len(encoded), sha256=hashlib.sha256(encoded).hexdigest())
