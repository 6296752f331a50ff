"""A JSON Lines job (`input_format: "jsonl"`), streamed: its input, an upload or a URL,
holds one JSON value per line, each a record the model's input schema must accept; line
i of its output, written to the object store, is the model's output for record i.

The worker never holds the input or the output whole, whatever their size: it reads the
input a chunk at a time, runs its records through the model in batches (the model's batch
size, and at most LINES_BATCH_BYTES of records) and writes their outputs as it goes, a
part at a time (`object_store.store.ObjectWriter`). Blank lines are skipped.

    a record that is not JSON, that the schema or the model's
    `prepare` refuses, or longer than the batch byte budget      failed, naming its line
    the input gone, too large or refused                         failed
    the store or the input's server not answering, a model
    error                                                        retried (from the start)

An attempt that fails leaves no output behind (its upload is aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from object_store.store import StoreUnavailable
from ray_workers.models.base import UNENCODABLE, InvalidInput, Model, ModelError, predictions
from ray_workers.payload_references import InputUnreadable, PayloadReferences, named_input
from wire.envelope import Job, OutputRef

logger = logging.getLogger(__name__)

# Records a batch holds at most, in bytes (at least one record): with the output part
# being written, what a worker holds for a JSON Lines job.
LINES_BATCH_BYTES = 2**18
NEWLINE = b"\n"
UTF8_BOM = b"\xef\xbb\xbf"


class RecordRefused(Exception):
    """A record that can never succeed: the job fails (permanent), naming its line."""


class OutputUnencodable(Exception):
    """The model returned an output JSON cannot hold (permanent)."""


@dataclass(frozen=True)
class LinesOutcome:
    """A JSON Lines job's end: its output's reference, or why it failed."""

    output_ref: OutputRef | None = None
    error: str | None = None
    permanent: bool = False
    # The model failed (not a record): the circuit breaker counts it.
    model_failed: bool = False


async def split_lines(chunks: AsyncIterator[bytes], max_line_bytes: int) -> AsyncIterator[tuple[int, bytes]]:
    """Each line that is not blank, with its number (from 1), whatever the chunks' borders;
    RecordRefused for a line over `max_line_bytes` (refused before it is held whole)."""
    pending = bytearray()
    number = 0
    async for chunk in _without_bom(chunks):
        start = 0
        while (end := chunk.find(NEWLINE, start)) != -1:
            number += 1
            if pending:
                pending += chunk[start:end]
                line = bytes(pending)
                pending.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            _check_length(number, len(line), max_line_bytes)
            if line.strip():
                yield number, line
        pending += chunk[start:]
        _check_length(number + 1, len(pending), max_line_bytes)
    if pending.strip():
        yield number + 1, bytes(pending)


async def _without_bom(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks without a leading UTF-8 byte order mark (editors on Windows write one;
    JSON does not allow it), whatever the chunks' sizes."""
    head: bytes | None = b""
    async for chunk in chunks:
        if head is not None:
            head += chunk
            if len(head) < len(UTF8_BOM) and UTF8_BOM.startswith(head):
                continue
            chunk, head = head.removeprefix(UTF8_BOM), None
        yield chunk
    if head:
        yield head


def _check_length(number: int, length: int, max_line_bytes: int) -> None:
    if length > max_line_bytes:
        raise RecordRefused(
            f"line {number} is longer than {max_line_bytes} bytes (WORKER_BATCH_MAX_BYTES): "
            "one record must fit a batch"
        )


class JsonLinesJobs:
    """Runs one model's JSON Lines jobs, one at a time, through its worker's payloads."""

    def __init__(
        self, model: Model, payloads: PayloadReferences, max_records: int, max_line_bytes: int
    ) -> None:
        self._model = model
        self._payloads = payloads
        self._max_records = max_records
        self._max_line_bytes = max_line_bytes
        self._encoder = msgspec.json.Encoder()

    async def run(self, job: Job, attempt: int) -> LinesOutcome:
        """The job run to its end, its output stored; never raises for a job's failure."""
        try:
            return LinesOutcome(output_ref=await self._run(job, attempt))
        except RecordRefused as exc:
            return LinesOutcome(error=f"invalid input: {exc}", permanent=True)
        except InputUnreadable as exc:
            return LinesOutcome(error=str(exc), permanent=exc.permanent)
        except StoreUnavailable as exc:
            return LinesOutcome(error=f"the output could not be stored: {exc}")
        except InvalidInput as exc:
            return LinesOutcome(error=str(exc), permanent=True)
        except ModelError as exc:
            logger.warning("job %s: the model failed on its records: %s", job.id, exc)
            return LinesOutcome(error=str(exc), model_failed=True)
        except OutputUnencodable as exc:
            return LinesOutcome(error=str(exc), permanent=True)

    async def _run(self, job: Job, attempt: int) -> OutputRef:
        digest = hashlib.sha256()
        size = 0
        records = 0
        chunks = self._payloads.input_chunks(job)
        async with contextlib.aclosing(chunks), self._payloads.output_writer(job.id) as output:
            async for batch in self._batches(split_lines(chunks, self._max_line_bytes)):
                prepared = await asyncio.to_thread(self._prepared, job, batch, attempt)
                outputs = await self._predicted(job, prepared)
                encoded = await asyncio.to_thread(self._encoded, outputs, digest)
                await output.write(encoded)
                size += len(encoded)
                records += len(batch)
        logger.info("job %s: %d records, %d bytes of output", job.id, records, size)
        return await self._payloads.output_ref(job.id, size, digest.hexdigest())

    async def _batches(
        self, lines: AsyncIterator[tuple[int, bytes]]
    ) -> AsyncIterator[list[tuple[int, bytes]]]:
        batch: list[tuple[int, bytes]] = []
        held_bytes = 0
        async for numbered in lines:
            batch.append(numbered)
            held_bytes += len(numbered[1])
            if len(batch) >= self._max_records or held_bytes >= LINES_BATCH_BYTES:
                yield batch
                batch, held_bytes = [], 0
        if batch:
            yield batch

    def _prepared(self, job: Job, batch: Sequence[tuple[int, bytes]], attempt: int) -> list[Any]:
        """Each record decoded, checked against the schema and prepared (on a thread)."""
        prepared = []
        source = named_input(job)
        for number, line in batch:
            read = self._payloads.checked(f"line {number} of {source}", line)
            if read.error is not None:
                raise RecordRefused(read.error.removeprefix("invalid input: "))
            try:
                prepared.append(self._model.prepare(read.value, attempt))
            except InvalidInput as exc:
                raise RecordRefused(f"line {number}: {exc}") from exc
        return prepared

    async def _predicted(self, job: Job, prepared: list[Any]) -> list[Any]:
        try:
            return await predictions(self._model, prepared)
        except ModelError:
            raise
        except Exception as exc:
            logger.exception("job %s: model %s raised unexpectedly", job.id, self._model.name)
            raise ModelError("internal model error") from exc

    def _encoded(self, outputs: list[Any], digest: hashlib._Hash) -> bytes:
        """The outputs as lines, added to the output's digest (on a thread)."""
        try:
            encoded = self._encoder.encode_lines(outputs)
        except UNENCODABLE as exc:
            raise OutputUnencodable(f"the model's output cannot be encoded as JSON: {exc!r}"[:1000]) from exc
        digest.update(encoded)
        return encoded
