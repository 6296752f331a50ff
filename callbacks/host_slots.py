"""Delivery slots: how many callbacks may be in flight, per host and in all, and who is next.

A delivery for a host whose slots are taken waits here, in memory, for one to free up;
it is not sent back to the broker (that cost one healthy host five seconds per lap).
The broker keeps what is beyond the dispatcher's prefetch, which bounds this memory.
Fairness: when a slot frees, waiting hosts are served in turn (round robin), so one
host with a deep backlog cannot take the slots of another. A host may also hold only
`max_held_per_host` consumed messages (each one hold, however many of its events it
carries, while any of them is in flight or waiting): past that, `try_hold` says no and
the caller defers the message's events, so a slow host cannot fill the prefetch window
(counted in messages) that the others need. The held messages' bytes are bounded too
(`max_held_bytes_per_host`, each message's body counted once): a host's first message
is always taken, whatever its size, and past the bound the next is deferred.

Plain asyncio, no network: tested directly.
"""

from __future__ import annotations

import asyncio
from collections import deque


class HostSlots:
    def __init__(
        self, total: int, per_host: int, max_held_per_host: int, max_held_bytes_per_host: int = 64 << 20
    ) -> None:
        if not 1 <= per_host <= total:
            raise ValueError(f"need 1 <= per_host ({per_host}) <= total ({total})")
        if max_held_per_host < per_host:
            raise ValueError(f"max_held_per_host ({max_held_per_host}) must be >= per_host ({per_host})")
        self._total = total
        self._per_host = per_host
        self._max_held = max_held_per_host
        self._max_held_bytes = max_held_bytes_per_host
        self._held_bytes: dict[str, int] = {}
        self._in_flight_total = 0
        self._in_flight: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # Hosts with waiters, in the order they are served next.
        self._turns: deque[str] = deque()

    def held(self, host: str) -> int:
        return self._held.get(host, 0)

    def held_bytes(self, host: str) -> int:
        return self._held_bytes.get(host, 0)

    def in_flight(self, host: str) -> int:
        return self._in_flight.get(host, 0)

    @property
    def hosts_tracked(self) -> int:
        return len(self._held)

    def try_hold(self, host: str, size_bytes: int = 0) -> bool:
        """Reserve a place for one message's deliveries to `host`; False when the host holds
        its maximum of messages or bytes. End it with `unhold` (same size) once they are done."""
        held = self._held.get(host, 0)
        held_bytes = self._held_bytes.get(host, 0)
        if held >= self._max_held or (held and held_bytes + size_bytes > self._max_held_bytes):
            return False
        self._held[host] = held + 1
        self._held_bytes[host] = held_bytes + size_bytes
        return True

    async def acquire(self, host: str) -> None:
        """Wait for a slot for one delivery of a held message; `release` it once it is done."""
        if not self._waiting.get(host) and self._has_room(host):
            self._take(host)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(host, deque())
        queue.append(waiter)
        if host not in self._turns:
            self._turns.append(host)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back_slot(host)  # granted, then cancelled before it was used
            else:
                self._forget_waiter(host, waiter)
            raise  # the hold stays: the caller ends it with `unhold`

    def release(self, host: str) -> None:
        """The delivery is done: its slot goes to the next waiting host."""
        self._give_back_slot(host)

    def unhold(self, host: str, size_bytes: int = 0) -> None:
        """The message's deliveries to `host` are all done (or were never started)."""
        remaining = self._held[host] - 1
        if remaining:
            self._held[host] = remaining
            self._held_bytes[host] -= size_bytes
        else:
            del self._held[host]
            del self._held_bytes[host]

    def _has_room(self, host: str) -> bool:
        return self._in_flight_total < self._total and self._in_flight.get(host, 0) < self._per_host

    def _take(self, host: str) -> None:
        self._in_flight_total += 1
        self._in_flight[host] = self._in_flight.get(host, 0) + 1

    def _give_back_slot(self, host: str) -> None:
        self._in_flight_total -= 1
        remaining = self._in_flight[host] - 1
        if remaining:
            self._in_flight[host] = remaining
        else:
            del self._in_flight[host]
        self._grant()

    def _forget_waiter(self, host: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(host)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._waiting[host]
                self._turns.remove(host)

    def _grant(self) -> None:
        """Hand free slots to waiting hosts, one per host per turn."""
        skipped = 0
        while self._turns and self._in_flight_total < self._total and skipped < len(self._turns):
            host = self._turns.popleft()
            if self._in_flight.get(host, 0) >= self._per_host:
                self._turns.append(host)
                skipped += 1
                continue
            skipped = 0
            queue = self._waiting[host]
            waiter = queue.popleft()
            if not waiter.done():  # a cancelled waiter is skipped; its task cleans up
                self._take(host)
                waiter.set_result(None)
            if queue:
                self._turns.append(host)
            else:
                del self._waiting[host]
