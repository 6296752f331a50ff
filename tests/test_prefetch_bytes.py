"""The byte-bounded prefetch policy (policies.prefetch_bytes): a table, no broker."""

from __future__ import annotations

import pytest

from policies.prefetch_bytes import PrefetchBytes


@pytest.mark.parametrize(
    ("sizes", "by_count", "prefetch"),
    [
        ([], 256, 256),  # nothing seen yet: the count decides
        ([1000], 256, 256),  # small bodies: the count decides
        ([1 << 20], 256, 32),  # 1 MiB bodies: 32 MiB / 1 MiB
        ([64 << 20], 256, 1),  # one body over the whole budget: still one at a time
        ([1 << 20, 1000], 256, 35),  # the large body is remembered, shrinking by the decay
    ],
)
def test_the_prefetch_holds_at_most_max_bytes_of_the_large_bodies_lately_seen(
    sizes: list[int], by_count: int, prefetch: int
) -> None:
    policy = PrefetchBytes(max_bytes=32 << 20, decay=0.9)
    for size in sizes:
        policy.observe(size)

    assert policy.bound(by_count) == prefetch
