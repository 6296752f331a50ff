"""The demo's second part: jobs without a callback, read back from their records.

Waiting on the submit (`Prefer: wait`), replaying it under the same `Idempotency-Key`,
polling `GET /v1/jobs/{id}`, and canceling queued jobs of a burst.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

POLL_TIMEOUT_S = 30.0
BURST = 120
CANCELED_OF_BURST = 10


async def records_tour(base_url: str) -> bool:
    """Print each step; True when every answer is the one the API promises."""
    print("\njobs without a callback: wait, replay, poll, cancel")
    async with httpx.AsyncClient(base_url=base_url, timeout=70) as client:
        ok = await _wait_and_replay(client)
        ok &= await _poll(client)
        ok &= await _cancel_burst(client)
    return ok


async def _wait_and_replay(client: httpx.AsyncClient) -> bool:
    headers = {"Prefer": "wait=10", "Idempotency-Key": f"demo-{time.time_ns()}"}
    body = {"input": {"question": "still there?"}}
    started = time.monotonic()
    first = await client.post("/v1/models/echo/jobs", json=body, headers=headers)
    waited_ms = (time.monotonic() - started) * 1000
    replay = await client.post("/v1/models/echo/jobs", json=body, headers=headers)
    print(
        f"  POST echo, Prefer: wait=10      -> {first.status_code} in {waited_ms:.0f} ms, "
        f"{first.json().get('status')}, output = {first.json().get('output')}"
    )
    print(
        f"  same Idempotency-Key again      -> {replay.status_code}, same id: "
        f"{replay.json()['id'] == first.json()['id']}, Idempotent-Replayed: "
        f"{replay.headers.get('idempotent-replayed')}"
    )
    return first.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"


async def _poll(client: httpx.AsyncClient) -> bool:
    accepted = await client.post("/v1/models/embed-minilm/jobs", json={"input": "Poll me when you can."})
    job_id = accepted.json()["id"]
    print(
        f"  POST embed-minilm, no wait      -> {accepted.status_code}, queue_position "
        f"{accepted.json().get('queue_position')}, eta_s {accepted.json().get('eta_s')}"
    )
    seen: list[str] = []
    deadline = time.monotonic() + POLL_TIMEOUT_S
    record: dict[str, Any] = {}
    while time.monotonic() < deadline:
        record = (await client.get(f"/v1/jobs/{job_id}")).json()
        if not seen or seen[-1] != record["status"]:
            seen.append(record["status"])
        if record["status"] in ("succeeded", "failed", "expired", "canceled"):
            break
        await asyncio.sleep(0.05)  # a polling client's interval; Prefer: wait avoids it
    dimensions = (record.get("output") or {}).get("dimensions")
    print(f"  GET /v1/jobs/{{id}} while polling -> {' -> '.join(seen)}; {dimensions}-dim embedding")
    return record.get("status") == "succeeded"


async def _cancel_burst(client: httpx.AsyncClient) -> bool:
    async def submit(n: int) -> str:
        body = {"input": f"Sentence number {n} of a burst.", "priority": "low"}
        response = await client.post("/v1/models/embed-minilm/jobs", json=body)
        return str(response.json()["id"])

    ids = await asyncio.gather(*(submit(n) for n in range(BURST)))
    cancels = await asyncio.gather(
        *(client.post(f"/v1/jobs/{job_id}/cancel") for job_id in ids[-CANCELED_OF_BURST:])
    )
    canceled = sum(response.status_code == 200 for response in cancels)
    too_late = [response.json().get("job_status") for response in cancels if response.status_code == 409]
    print(
        f"  {BURST} low-priority jobs, cancel the last {CANCELED_OF_BURST} -> {canceled} canceled (200), "
        f"{len(too_late)} too late (409: {', '.join(sorted(set(too_late))) or '-'})"
    )
    return all(response.status_code in (200, 409) for response in cancels)
