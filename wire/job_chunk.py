"""A chunk: CHUNK_JOBS jobs of one queue as one broker message.

A batch's jobs would each cost a message: a publish and its confirm, the broker's store,
delivery and ack, and the worker's consume. A full chunk of a batch costs those once, as
does a chunk of single jobs that the ingress grouped under a backlog
(`ingress.single_job_groups`).
Chunks wait in queues of their own beside the jobs' (`Topology.chunk_queue`, same lane
and priority), so every count of waiting jobs stays exact: plain messages + CHUNK_JOBS
x chunk messages. Only full chunks of small jobs go there (CHUNK_MAX_BYTES in all); the
rest of a batch, retries, replays and parked jobs are one message per job, as a single
submission's is at low load.

The worker splits a chunk into one delivery per job (`broker.client.ChunkPart`): each
job then runs, retries, parks and calls back exactly as if it had come alone, and the
chunk is acked once every job's outcome is durable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from wire.envelope import UndecodableMessage
from wire.outgoing import OutgoingMessage

# Jobs in a chunk: a chunk's message is counted as this many jobs everywhere.
CHUNK_JOBS = 32
# The most a chunk's jobs may weigh together: jobs this large are cheap to send one by
# one, and a worker's chunk consumers (one per lane and priority, each holding a chunk at
# least) stay within a few MiB whatever the batches weigh.
CHUNK_MAX_BYTES = 256 * 1024
# The AMQP type of a chunk's message.
CHUNK_TYPE = "inferq.job-chunk"


@dataclass(frozen=True)
class ChunkedJob:
    """One job as a chunk carries it: its own message's id, priority, headers and body."""

    message_id: str
    priority: int
    headers: Mapping[str, Any]
    body: bytes


_Encoded = list[tuple[str, int, dict[str, Any], msgspec.Raw]]


def chunk_message(messages: Sequence[OutgoingMessage]) -> OutgoingMessage:
    """One message carrying CHUNK_JOBS job messages of one queue (same priority)."""
    if len(messages) != CHUNK_JOBS:
        raise ValueError(f"a chunk carries {CHUNK_JOBS} jobs, not {len(messages)}")
    first = messages[0]
    parts: _Encoded = [
        (m.message_id, m.priority or 0, dict(m.headers or {}), msgspec.Raw(m.body)) for m in messages
    ]
    return OutgoingMessage(
        msgspec.json.encode(parts),
        message_id=f"chunk_{first.message_id}",
        priority=first.priority,
        type=CHUNK_TYPE,
    )


def chunked_jobs(body: bytes) -> list[ChunkedJob]:
    """The job messages a chunk carries, each as it would have come alone."""
    try:
        parts = msgspec.json.decode(body, type=_Encoded)
    except msgspec.DecodeError as exc:
        raise UndecodableMessage(f"not a valid job chunk: {exc}") from exc
    return [ChunkedJob(mid, priority, headers, bytes(raw)) for mid, priority, headers, raw in parts]
