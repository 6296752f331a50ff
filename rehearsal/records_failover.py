"""The records' Redis primary lost during the rehearsal, as a drain or a node's death loses
it: its pod is stopped, and the rehearsal checks what the manifests promise (cluster/base/
redis.yaml): the sentinels promote a replica, a keyed job (which needs the records) is
accepted through the ingress and runs, its status reads `succeeded`, and the stopped node,
started again, comes back as a replica of the new primary (its script asks the sentinels).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from loadgen.callback_receiver import CallbackReceiver
from rehearsal.pods import Pod

STEP_TIMEOUT_S = 60.0


async def _within(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float = STEP_TIMEOUT_S) -> Any:
    """`check`'s first truthy answer; TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.5)


def _container_env(pod: Pod, name: str) -> dict[str, str]:
    return next(c.env for c in pod.containers if c.spec["name"] == name)


async def _primary(pod: Pod) -> str:
    """The primary's pod name as `pod`'s sentinel names it ('' when it names none)."""
    env = _container_env(pod, "sentinel")
    answer = await pod.exec_output(
        ["redis-cli", "-p", "26379", "sentinel", "get-master-addr-by-name", env["REDIS_PRIMARY_NAME"]], 5, env
    )
    return answer.split("\n")[0].split(".")[0].strip()


async def _replication(pod: Pod) -> dict[str, str]:
    answer = await pod.exec_output(["redis-cli", "info", "replication"], 5, _container_env(pod, "redis"))
    return dict(line.strip().split(":", 1) for line in answer.splitlines() if ":" in line)


async def _keyed_job(
    session: aiohttp.ClientSession, ingress: Pod, receiver: CallbackReceiver
) -> dict[str, Any]:
    """An echo job under an Idempotency-Key, sent until the ingress accepts it (503 while the
    records have no primary), then its callback and its status."""
    url = f"http://{ingress.address}:{ingress.ports['http']}"
    body = {"input": {"hello": "after the failover"}, "callback_url": receiver.url}
    headers = {"Idempotency-Key": str(uuid.uuid4())}

    async def accepted() -> str | None:
        async with session.post(f"{url}/v1/models/echo/jobs", json=body, headers=headers) as answer:
            return str(json.loads(await answer.text())["id"]) if answer.status == 202 else None

    job_id: str = await _within("a keyed job accepted", accepted)

    async def called_back() -> bool:
        return any(c.event["data"]["id"] == job_id and c.verified for c in receiver.received)

    await _within(f"job {job_id}'s verified callback", called_back)

    async def status() -> str | None:
        async with session.get(f"{url}/v1/jobs/{job_id}") as answer:
            found = str(json.loads(await answer.text()).get("status")) if answer.status == 200 else None
            return found if found == "succeeded" else None

    return {"job_id": job_id, "job_status": await _within(f"job {job_id} read as succeeded", status)}


async def rehearse_failover(
    redis_pods: list[Pod], ingress: Pod, api_key: str, receiver: CallbackReceiver
) -> dict[str, Any]:
    """Stop the primary's pod; what followed, with timings, or the step that failed (`error`)."""
    found: dict[str, Any] = {}
    try:
        pods = {pod.name: pod for pod in redis_pods}
        lost = found["primary_lost"] = await _within("a primary named", lambda: _primary(redis_pods[0]))
        survivor = next(pod for name, pod in pods.items() if name != lost)
        started = time.monotonic()
        pods[lost].stop()

        async def promoted() -> str | None:
            name = await _primary(survivor)
            return name if name and name != lost else None

        found["promoted"] = await _within("a replica promoted", promoted)
        found["promoted_after_s"] = round(time.monotonic() - started, 1)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as session:
            found.update(await _keyed_job(session, ingress, receiver))
        found["keyed_job_done_after_s"] = round(time.monotonic() - started, 1)
        pods[lost].start()

        async def rejoined() -> bool:
            replication = await _replication(pods[lost])
            return replication.get("role") == "slave" and replication.get("master_link_status") == "up"

        await _within(f"{lost} back as a replica", rejoined)
        replicas = (await _replication(pods[found["promoted"]])).get("connected_slaves")
        found["replicas_after_rejoin"] = int(replicas or 0)
    except (TimeoutError, aiohttp.ClientError, StopIteration, KeyError, ValueError) as exc:
        found["error"] = str(exc) or type(exc).__name__
    return found
