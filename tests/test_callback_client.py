"""The callback client's pure parts: answer classification, Retry-After parsing, the pinned resolver."""

from __future__ import annotations

import ipaddress
import socket
from datetime import UTC, datetime

import pytest

from callbacks.client import PinnedResolver, classify_response, retry_after_s

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        ("  7 ", 7.0),
        ("Sun, 29 Nov 2026 12:00:30 GMT", 30.0),  # HTTP-date, 30 s ahead
        ("Sun, 29 Nov 2026 11:59:00 GMT", 0.0),  # in the past: retry now
        ("²", None),  # a Unicode digit: isdigit() is true, float() raises
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_given_a_retry_after_header_then_seconds_or_none_never_an_exception(
    header: str | None, expected: float | None
) -> None:
    assert retry_after_s(header, now=NOW) == expected


async def test_given_a_pinned_host_then_it_resolves_only_to_the_checked_addresses() -> None:
    resolver = PinnedResolver()
    resolver.pin(
        "hooks.example", (ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("2001:db8::1"))
    )

    answers = await resolver.resolve("hooks.example", 443)

    assert [(a["host"], a["port"], a["family"], a["hostname"]) for a in answers] == [
        ("93.184.216.34", 443, socket.AF_INET, "hooks.example"),
        ("2001:db8::1", 443, socket.AF_INET6, "hooks.example"),
    ]


async def test_given_a_host_the_guard_never_checked_then_no_address_is_given() -> None:
    resolver = PinnedResolver()
    resolver.pin("a.example", (ipaddress.ip_address("93.184.216.34"),))

    with pytest.raises(OSError, match=r"b\.example"):
        await resolver.resolve("b.example", 80)


async def test_given_more_hosts_than_its_bound_then_the_least_recently_pinned_is_forgotten() -> None:
    resolver = PinnedResolver(max_hosts=2)
    address = (ipaddress.ip_address("93.184.216.34"),)
    for host in ("one.example", "two.example", "three.example"):
        resolver.pin(host, address)

    with pytest.raises(OSError):
        await resolver.resolve("one.example", 80)
    assert len(await resolver.resolve("three.example", 80)) == 1


@pytest.mark.parametrize(
    ("status", "retry_after", "delivered", "retryable", "wait_s"),
    [
        (200, None, True, False, None),
        (204, "30", True, False, None),  # delivered: nothing to wait for
        (301, None, False, True, None),  # redirects are not followed: try again later
        (408, None, False, True, None),
        (429, "120", False, True, 120.0),
        (500, None, False, True, None),
        (503, "60", False, True, 60.0),
        (400, None, False, False, None),
        (401, None, False, False, None),
        (404, "5", False, False, 5.0),
        (410, None, False, False, None),
    ],
)
def test_a_receivers_answer_is_delivered_retried_or_final(
    status: int, retry_after: str | None, delivered: bool, retryable: bool, wait_s: float | None
) -> None:
    result = classify_response(status, retry_after)

    assert (result.delivered, result.retryable, result.status) == (delivered, retryable, status)
    assert (result.error is None) == delivered
    assert result.retry_after_s == wait_s
