"""HostSlots: per-host and total bounds on deliveries in flight, waiting in memory, and
hosts served in turn. Plain asyncio, no network."""

from __future__ import annotations

import asyncio

import pytest

from callbacks.host_slots import HostSlots


async def _hold_and_acquire(slots: HostSlots, host: str, granted: list[str]) -> None:
    assert slots.try_hold(host)
    await slots.acquire(host)
    granted.append(host)


def _done(slots: HostSlots, host: str) -> None:
    """A one-delivery message is done: its slot and its hold end."""
    slots.release(host)
    slots.unhold(host)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_given_a_free_host_then_deliveries_start_up_to_its_cap_and_the_rest_wait() -> None:
    slots = HostSlots(total=10, per_host=2, max_held_per_host=100)
    granted: list[str] = []
    tasks = [asyncio.create_task(_hold_and_acquire(slots, "a", granted)) for _ in range(5)]
    await _settle()

    assert granted == ["a", "a"]
    assert (slots.in_flight("a"), slots.held("a")) == (2, 5)

    _done(slots, "a")
    await _settle()
    assert granted == ["a", "a", "a"] and slots.in_flight("a") == 2
    for _ in range(4):
        _done(slots, "a")
        await _settle()
    await asyncio.gather(*tasks)
    assert slots.hosts_tracked == 0


async def test_given_the_total_is_taken_then_waiting_hosts_are_served_in_turn() -> None:
    slots = HostSlots(total=2, per_host=2, max_held_per_host=100)
    granted: list[str] = []
    tasks = [asyncio.create_task(_hold_and_acquire(slots, "busy", granted)) for _ in range(6)]
    await _settle()
    tasks.append(asyncio.create_task(_hold_and_acquire(slots, "quiet", granted)))
    await _settle()
    assert granted == ["busy", "busy"]

    _done(slots, "busy")
    await _settle()
    _done(slots, "busy")
    await _settle()

    # Four "busy" deliveries waited before "quiet" arrived, yet "quiet" is served by the
    # second free slot: the busy host does not get every slot that frees up.
    assert granted[2:] == ["busy", "quiet"]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_given_a_host_holding_its_maximum_then_try_hold_says_no_until_one_ends() -> None:
    slots = HostSlots(total=4, per_host=2, max_held_per_host=3)
    assert [slots.try_hold("a") for _ in range(4)] == [True, True, True, False]
    assert slots.try_hold("b")  # another host has its own share
    slots.unhold("a")
    assert slots.try_hold("a")


async def test_given_a_waiting_delivery_is_cancelled_then_its_place_is_not_leaked() -> None:
    slots = HostSlots(total=1, per_host=1, max_held_per_host=10)
    granted: list[str] = []
    first = asyncio.create_task(_hold_and_acquire(slots, "a", granted))
    await _settle()
    assert slots.try_hold("a")
    waiting = asyncio.create_task(slots.acquire("a"))
    await _settle()

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.unhold("a")  # what the dispatcher does when its acquire is cancelled
    await first
    _done(slots, "a")

    assert (slots.in_flight("a"), slots.held("a"), slots.hosts_tracked) == (0, 0, 0)
    await _hold_and_acquire(slots, "a", granted)  # the slot is free again
    assert granted == ["a", "a"]


async def test_given_a_message_of_several_events_then_it_holds_once_and_each_event_takes_a_slot() -> None:
    slots = HostSlots(total=10, per_host=2, max_held_per_host=2)
    granted: list[str] = []
    assert slots.try_hold("a")  # one batch message of three events for host a
    tasks = [asyncio.create_task(_acquire(slots, "a", granted)) for _ in range(3)]
    await _settle()

    assert granted == ["a", "a"]  # the host's slot cap still bounds its requests
    assert (slots.in_flight("a"), slots.held("a")) == (2, 1)
    assert slots.try_hold("a") and not slots.try_hold("a")  # the share counts messages
    slots.unhold("a")

    for _ in range(3):
        slots.release("a")
        await _settle()
    await asyncio.gather(*tasks)
    slots.unhold("a")
    assert slots.hosts_tracked == 0


async def _acquire(slots: HostSlots, host: str, granted: list[str]) -> None:
    await slots.acquire(host)
    granted.append(host)


@pytest.mark.parametrize(
    ("total", "per_host", "max_held"),
    [(4, 5, 10), (4, 0, 10), (4, 2, 1)],
)
def test_given_inconsistent_bounds_then_construction_fails_naming_them(
    total: int, per_host: int, max_held: int
) -> None:
    with pytest.raises(ValueError, match="per_host"):
        HostSlots(total, per_host, max_held)


@pytest.mark.parametrize(
    ("held_sizes", "next_size", "taken"),
    [
        ([], 10_000, True),  # a host's first message is taken whatever its size
        ([600], 400, True),
        ([600], 401, False),
        ([100, 100], 800, True),
        ([100, 100], 801, False),
    ],
)
def test_given_held_bytes_then_a_message_past_the_host_s_byte_bound_is_refused(
    held_sizes: list[int], next_size: int, taken: bool
) -> None:
    """Buffers bound by bytes: a slow host could hold CALLBACK_PREFETCH / 2 messages of any size."""
    slots = HostSlots(total=8, per_host=2, max_held_per_host=100, max_held_bytes_per_host=1000)
    for size in held_sizes:
        assert slots.try_hold("slow", size)

    assert slots.try_hold("slow", next_size) is taken
    assert slots.try_hold("other", 1000)
    for size in held_sizes:
        slots.unhold("slow", size)
    if taken:
        slots.unhold("slow", next_size)
    assert slots.held("slow") == 0 and slots.held_bytes("slow") == 0
