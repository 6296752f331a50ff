"""The terminal ledger: the terminal event each job ended with, first write wins.

At-least-once delivery lets a job run twice (redelivered after a lost connection, or
picked up by two replicas). Without a record the copies could end differently, one
`job.succeeded` and the other `job.failed` after its retries, and the caller would get
two contradictory events. So before a worker publishes a terminal event it claims the
job's terminal state here, atomically (a Lua script: the first claim wins), and a copy
whose claim loses publishes nothing; a job already recorded is settled on arrival
without running the model again. Duplicates of the *same* event can still happen (a
callback sent, its ack lost); they share one `webhook-id`.

The one home of redis-py. Keys are `{QUEUE_PREFIX}inferq:terminal:{job id}` and expire
after RESULT_TTL_S. When Redis cannot be reached a call raises `LedgerUnavailable` and
the worker falls back to plain at-least-once (it publishes, and logs that it could not
check): no job waits on Redis, and uniqueness holds again once it is back. After a
failure the ledger is skipped for LEDGER_RETRY_S (a breaker), so a Redis that is gone
costs each batch nothing, not a connect timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import redis.asyncio
import redis.exceptions

from contract.broker import redact_url
from contract.circuit_breaker import CircuitBreaker

_CLAIM = """
local recorded = redis.call('GET', KEYS[1])
if recorded then return recorded end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""
_ERRORS = (redis.exceptions.RedisError, OSError, TimeoutError)
LEDGER_RETRY_S = 10.0


class LedgerUnavailable(Exception):
    """Redis did not answer (or failed moments ago: `skipped`); proceed without the check."""

    def __init__(self, message: str, skipped: bool = False) -> None:
        super().__init__(message)
        self.skipped = skipped


class TerminalLedger:
    def __init__(self, url: str, key_prefix: str, ttl_s: int, timeout_s: float = 1.0) -> None:
        self._display_url = redact_url(url)
        self._redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._claim = self._redis.register_script(_CLAIM)
        self._key_prefix = f"{key_prefix}inferq:terminal:"
        self._ttl_s = ttl_s
        self._breaker = CircuitBreaker(failure_threshold=1, cooldown_s=LEDGER_RETRY_S)

    def __repr__(self) -> str:
        return f"TerminalLedger({self._display_url})"

    async def recorded(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The terminal event already recorded for each of these jobs that has one."""
        if not job_ids:
            return {}
        async with self._guarded("read"):
            values = await self._redis.mget([self._key_prefix + job_id for job_id in job_ids])
        return {
            job_id: str(value) for job_id, value in zip(job_ids, values, strict=True) if value is not None
        }

    async def claim(self, events: Mapping[str, str]) -> dict[str, str]:
        """Claim each job's terminal event; returns what each job is recorded with now
        (its own event where the claim won, the earlier one where it lost)."""
        if not events:
            return {}
        async with self._guarded("claim in"), self._redis.pipeline(transaction=False) as pipe:
            for job_id, event in events.items():
                await self._claim(keys=[self._key_prefix + job_id], args=[event, self._ttl_s], client=pipe)
            results = await pipe.execute()
        return {job_id: str(result) for job_id, result in zip(events, results, strict=True)}

    async def forget(self, job_id: str) -> None:
        """Drop a job's record: replay re-opens a job on purpose, so it may end anew."""
        async with self._guarded("update"):
            await self._redis.delete(self._key_prefix + job_id)

    @contextlib.asynccontextmanager
    async def _guarded(self, action: str) -> AsyncIterator[None]:
        """Redis errors become LedgerUnavailable; after one, calls are skipped for a while."""
        if not self._breaker.allow():
            raise LedgerUnavailable(
                f"skipped: Redis at {self._display_url} failed less than {LEDGER_RETRY_S:.0f} s ago",
                skipped=True,
            )
        try:
            yield
        except _ERRORS as exc:
            self._breaker.record_failure()
            raise LedgerUnavailable(
                f"cannot {action} the terminal ledger at {self._display_url}: {exc!r}"
            ) from exc
        self._breaker.record_success()

    async def close(self) -> None:
        await self._redis.aclose()
