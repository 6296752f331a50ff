"""A batch request's body, `{"jobs": [job, ...]}`, decoded within its budgets, and each
job's problem named by its JSON pointer (`/jobs/17/input/texts/0`).

The whole body shares the single job's JSON budget (MAX_JSON_VALUES values, one level
deeper), so decoding a batch costs no more memory than decoding the largest single job
could: a batch is many small jobs, not a way around the budgets.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from ingress.json_budget import JsonBudget
from ingress.problems import Problem
from ingress.request_body import JobRequest, decode_body

# msgspec names where a value failed: "... - at `$.jobs[17].input`".
_PATH = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`$")
_PATH_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
# A refused batch lists at most this many of its bad jobs' errors.
MAX_LISTED_ERRORS = 100


class BatchRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    jobs: list[JobRequest]


def decode_batch_request(body: bytes, budget: JsonBudget, max_jobs: int) -> list[JobRequest]:
    """The batch's jobs (1 to `max_jobs`), or the Problem that names what is wrong where."""
    batch_budget = JsonBudget(budget.max_depth + 2, budget.max_values)  # {"jobs": [ ... ]}
    try:
        batch = decode_body(body, batch_budget, BatchRequest)
    except msgspec.ValidationError as exc:
        pointer, detail = _located(str(exc))
        raise Problem(
            422,
            "validation-error",
            "Unprocessable Content",
            f"invalid batch request: {exc}; nothing was queued",
            errors=[{"pointer": pointer, "detail": detail}],
        ) from exc
    if not 1 <= len(batch.jobs) <= max_jobs:
        raise Problem(
            422,
            "batch-size",
            "Unprocessable Content",
            f"a batch holds 1 to {max_jobs} jobs (BATCH_MAX_JOBS); this one holds {len(batch.jobs)}",
            errors=[{"pointer": "/jobs", "detail": f"{len(batch.jobs)} jobs"}],
            extensions={"limit": "BATCH_MAX_JOBS", "allowed": max_jobs},
        )
    return batch.jobs


def job_errors(index: int, problem: Problem) -> list[dict[str, Any]]:
    """One job's Problem as entries of the batch's `errors`, each with the job's pointer."""
    base = f"/jobs/{index}"
    if not problem.errors:
        field = {"metadata-too-large": "/metadata"}.get(problem.slug, "")
        return [{"pointer": base + field, "type": problem.slug, "detail": problem.detail}]
    entries = []
    for error in problem.errors:
        if "pointer" in error:
            where = base + error["pointer"]
        elif "field" in error:
            where = f"{base}/{error['field']}"
        else:
            where = base
        entries.append(
            {"pointer": where, "type": problem.slug, "detail": error.get("detail", problem.detail)}
        )
    return entries


def invalid_batch(errors: list[dict[str, Any]], bad_jobs: int, jobs: int) -> Problem:
    return Problem(
        422,
        "invalid-jobs",
        "Unprocessable Content",
        f"{bad_jobs} of {jobs} jobs are invalid (see errors, by JSON pointer); nothing was queued",
        errors=errors[:MAX_LISTED_ERRORS],
        extensions={"invalid_jobs": bad_jobs},
    )


def _located(message: str) -> tuple[str, str]:
    """msgspec's message as (JSON pointer, message without its location)."""
    match = _PATH.search(message)
    if match is None:
        return "", message
    pointer = "".join(
        f"/{name}" if name else f"/{index}" for name, index in _PATH_PART.findall(match.group(1))
    )
    return pointer, message[: match.start()]
