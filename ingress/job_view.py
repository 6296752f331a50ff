"""What `GET /v1/jobs/{id}` (and a finished `Prefer: wait`) answers: a job record as JSON.

Times are RFC 3339 in UTC; `output` appears once the job succeeded (null, with
`output_omitted`, when it was too large to keep in the record), `error` once it
failed, expired or was canceled; `queue_position` and `eta_s` only while it is queued
(both rough: see `job_records.store`); `callback` is null for a job without one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from job_records.store import JobRecord, Placement


def _time(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def job_view(record: JobRecord, placement: Placement | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": record.id,
        "model": record.model,
        "status": record.status,
        "priority": record.priority,
        "attempts": record.attempts,
        "metadata": record.metadata,
        "created_at": _time(record.created_ms),
        "started_at": _time(record.started_ms),
        "finished_at": _time(record.finished_ms),
        "callback": None
        if record.callback_url is None
        else {"url": record.callback_url, "state": record.delivery, "attempts": record.delivery_attempts},
    }
    if record.status == "succeeded" and record.output_ref is not None:
        ref = record.output_ref
        view.update(output_url=ref.url, output_size=ref.size, output_sha256=ref.sha256)
    elif record.status == "succeeded":
        view["output"] = record.output
        if record.output_omitted_bytes is not None:
            view["output_omitted"] = {
                "bytes": record.output_omitted_bytes,
                "reason": "over RECORD_OUTPUT_MAX_BYTES: the output went by callback only",
            }
    elif record.error is not None:
        view["error"] = record.error
    if placement is not None:
        view.update(placement_view(placement))
    return view


def placement_view(placement: Placement) -> dict[str, Any]:
    return {"queue_position": placement.queue_position, "eta_s": placement.eta_s}
