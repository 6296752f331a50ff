"""Payloads by reference, in a worker: inputs read from the object store or fetched from
a URL, large outputs written to the store.

A job's input named by reference (`input_ref`, an upload; or `input_url`, fetched through
the callback-URL guard by `ray_workers.input_fetch`) is read when the job is taken:
the ingress checked only that it exists and fits, so here it is decoded and checked
against the model's input schema, as the ingress checks an inline input. A miss or an
input that is not JSON fails the job (permanent). An output over OUTPUT_INLINE_MAX_BYTES
is written to `outputs/<job id>` and travels as a presigned GET that expires with the
job's record. A store that does not answer, either way, sends the job to its retry tiers
(transient). A JSON Lines job (`ray_workers.json_lines`) takes its input a chunk at a time
and writes its output as it goes, so neither is ever held whole."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from model_catalogue.catalogue import load_catalogue
from model_catalogue.input_schemas import InputSchemas, ValidationBudgetExceeded
from object_store.store import ObjectMissing, ObjectStore, ObjectTooLarge, ObjectWriter, StoreUnavailable
from policies.callback_guard import SystemResolver
from ray_workers.input_fetch import FetchFailed, InputFetcher
from ray_workers.settings import WorkerSettings
from wire.envelope import Job, OutputRef

# The schema check's time budget for one referenced input (the ingress's is per request).
VALIDATION_BUDGET_S = 5.0
MAX_PRESIGNED_S = 7 * 24 * 3600
# Inputs larger than this are decoded and checked in a thread: the loop keeps the batch moving.
OFF_LOOP_BYTES = 64 * 1024


class InputUnreadable(Exception):
    """A referenced input could not be read; `permanent` when trying again cannot help."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


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
        """The input the job names, by `input_url` or by `input_ref`, read whole and checked."""
        named = named_input(job)
        try:
            if job.input_url is not None:
                data = await self._fetcher.fetch(job.input_url)
            else:
                read = await self._store_or_refuse(named).read(job.input_ref or "", self._max_bytes)
                if read is None:
                    raise ObjectMissing(job.input_ref)
                data = read
        except (FetchFailed, StoreUnavailable, ObjectTooLarge, ObjectMissing, InputUnreadable) as exc:
            unreadable = _unreadable(named, exc)
            return ReadInput(error=str(unreadable), permanent=unreadable.permanent)
        return await self._decoded(named, data)

    async def input_chunks(self, job: Job) -> AsyncGenerator[bytes, None]:
        """The input the job names a chunk at a time, never whole; InputUnreadable, also midway."""
        named = named_input(job)
        try:
            if job.input_url is not None:
                chunks = self._fetcher.chunks(job.input_url)
            else:
                chunks = self._store_or_refuse(named).chunks(job.input_ref or "", self._max_bytes)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        except (FetchFailed, StoreUnavailable, ObjectTooLarge, ObjectMissing) as exc:
            raise _unreadable(named, exc) from exc

    def _store_or_refuse(self, named: str) -> ObjectStore:
        if self._store is None:
            raise InputUnreadable(f"{named}: this worker has no object store")
        return self._store

    async def _decoded(self, named: str, data: bytes | bytearray) -> ReadInput:
        if len(data) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self.checked, named, data)
        return self.checked(named, data)

    def checked(self, named: str, data: bytes | bytearray | memoryview) -> ReadInput:
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
        await self._store_or_fail().put(_output_key(job_id), encoded)
        return await self.output_ref(job_id, len(encoded), hashlib.sha256(encoded).hexdigest())

    def output_writer(self, job_id: str) -> ObjectWriter:
        """A writer of the job's output, sent a part at a time (a JSON Lines job's)."""
        return self._store_or_fail().writer(_output_key(job_id))

    async def output_ref(self, job_id: str, size: int, sha256: str) -> OutputRef:
        """The stored output's reference: a presigned GET that expires with the record."""
        url = await self._store_or_fail().presigned_get(_output_key(job_id), self._output_url_ttl_s)
        return OutputRef(url=url, size=size, sha256=sha256)

    def _store_or_fail(self) -> ObjectStore:
        if self._store is None:
            raise StoreUnavailable("this worker has no object store to write outputs to")
        return self._store


def _output_key(job_id: str) -> str:
    return f"outputs/{job_id}"


def named_input(job: Job) -> str:
    """How errors name the input a job refers to."""
    return f"input_url {job.input_url}" if job.input_url is not None else f"input_ref {job.input_ref}"


def _unreadable(named: str, exc: Exception) -> InputUnreadable:
    """What reading the input raised, as the job's error: missing, too large or refused
    are permanent; a store or server that did not answer, transient."""
    if isinstance(exc, InputUnreadable):
        return exc
    if isinstance(exc, FetchFailed):
        return InputUnreadable(str(exc), exc.permanent)
    if isinstance(exc, ObjectMissing):
        return InputUnreadable(f"{named}: the upload is gone", permanent=True)
    if isinstance(exc, ObjectTooLarge):
        return InputUnreadable(f"{named}: {exc}", permanent=True)
    return InputUnreadable(f"{named}: the object store did not answer: {exc}")
