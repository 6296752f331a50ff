"""The callback-URL classifier, checked directly with private and metadata literals
(no packet is sent anywhere: literals need no DNS and nothing connects)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from typing import Any

import pytest

from policies.callback_guard import (
    AllowList,
    CallbackUrlRejected,
    IPAddress,
    ResolutionUnavailable,
    SystemResolver,
    check_callback_url,
    non_public_reason,
)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # AWS/GCP/Azure metadata
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS IPv6 metadata
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("198.18.0.1", "private"),  # benchmarking range
        ("::ffff:127.0.0.1", "embeds IPv4 127.0.0.1 (loopback)"),
        ("::ffff:169.254.169.254", "embeds IPv4 169.254.169.254"),
        ("2002:a9fe:a9fe::", "embeds IPv4 169.254.169.254"),  # 6to4 of metadata
        ("64:ff9b::a00:1", "embeds IPv4 10.0.0.1"),  # NAT64 of a private address
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_classifier_names_why_an_address_is_not_public(address: str, reason: str | None) -> None:
    result = non_public_reason(ipaddress.ip_address(address))
    if reason is None:
        assert result is None
    else:
        assert result is not None and result.startswith(reason)


async def _no_dns(host: str, port: int) -> list[IPAddress]:
    raise AssertionError(f"no DNS lookup expected for {host}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254, which is link-local (includes cloud metadata)",
        ),
        ("http://[::ffff:10.0.0.1]/", "which is embeds IPv4 10.0.0.1 (private)"),
        ("https://10.0.0.5:8443/hook", "10.0.0.5, which is private"),
        ("file:///etc/passwd", "scheme 'file' is not allowed; expected http or https"),
        ("gopher://8.8.8.8/", "scheme 'gopher' is not allowed"),
        ("http://user@8.8.8.8/", "must not carry user information"),
        ("http:///nohost", "has no host"),
        ("http://8.8.8.8:99999/", "is not a valid URL"),
        # Hardening item 5: what the HTTP client could not send as given is refused at submit.
        ("http://93.184.216.34/\u0001", "contains a space or a control character"),
        ("http://exa mple.com/", "contains a space or a control character"),
        # Item 13: malformed names answer 422, not 500.
        ("http://a..com/", "is not a valid DNS name"),
        ("http://" + "a" * 64 + ".com/", "is not a valid DNS name"),
        ("http://x_y.example/", "is not a valid DNS name"),
        ("http://2130706433/", "ends in an all-numeric label"),
        ("http://0x7f.1/", "ends in an all-numeric label"),
        # Item 14: zone ids and port 0.
        ("http://[2606:4700::1111%25eth0]/", "carries a zone id"),
        ("http://93.184.216.34:0/", "has port 0"),
        ("http://example.com/" + "p" * 2100, "characters long; at most 2048"),
    ],
)
async def test_refused_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(CallbackUrlRejected) as error:
        await check_callback_url(url, AllowList(), _no_dns)
    assert reason in str(error.value)


async def test_a_host_resolving_to_any_private_address_is_refused() -> None:
    async def mixed(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.0.0.7")]

    with pytest.raises(CallbackUrlRejected, match=r"10\.0\.0\.7.*private"):
        await check_callback_url("https://hooks.example.com/x", AllowList(), mixed)


async def test_allow_list_admits_named_hosts_and_networks_only() -> None:
    async def internal(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address("10.0.0.7")]

    allow = AllowList.parse(["hooks.internal", "192.168.0.0/16", "[::1]"])
    target = await check_callback_url("http://hooks.internal:8080/cb?a=1", allow, internal)
    assert (target.host, target.port, target.path_and_query) == ("hooks.internal", 8080, "/cb?a=1")
    assert (await check_callback_url("http://192.168.4.4/", allow, _no_dns)).port == 80
    assert (await check_callback_url("http://[::1]:81/", allow, _no_dns)).addresses == (
        ipaddress.ip_address("::1"),
    )
    with pytest.raises(CallbackUrlRejected):
        await check_callback_url("http://other.internal/", allow, internal)
    with pytest.raises(CallbackUrlRejected):
        await check_callback_url("http://172.16.0.1/", allow, _no_dns)


async def test_public_url_passes_with_default_port() -> None:
    target = await check_callback_url("https://8.8.8.8", AllowList(), _no_dns)
    assert (target.scheme, target.port, target.path_and_query) == ("https", 443, "/")


async def test_given_a_unicode_host_then_the_a_label_is_what_is_resolved_and_sent() -> None:
    """Hardening item 5: an IDN host goes out as its A-label, never as raw Unicode."""
    asked: list[str] = []

    async def public(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        return [ipaddress.ip_address("93.184.216.34")]

    target = await check_callback_url("http://Bücher.example/ä?q=ü", AllowList(), public)

    assert asked == ["xn--bcher-kva.example"]
    assert (target.host, target.path_and_query) == ("xn--bcher-kva.example", "/%C3%A4?q=%C3%BC")


async def test_given_an_ipv6_literal_then_its_host_is_the_bare_address_and_checked() -> None:
    """Item 14: brackets belong to the URL, not the address; the address is what is checked."""
    target = await check_callback_url("http://[2606:4700::1111]:8443/x", AllowList(), _no_dns)
    assert (target.host, target.port, target.addresses) == (
        "2606:4700::1111",
        8443,
        (ipaddress.ip_address("2606:4700::1111"),),
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (socket.EAI_AGAIN, ResolutionUnavailable),
        # Review item 15: out of file descriptors (EAI_SYSTEM), memory or a failing server.
        (socket.EAI_SYSTEM, ResolutionUnavailable),
        (socket.EAI_MEMORY, ResolutionUnavailable),
        (socket.EAI_FAIL, ResolutionUnavailable),
        (socket.EAI_NONAME, CallbackUrlRejected),
    ],
)
async def test_a_temporary_dns_failure_is_retryable_and_a_definite_one_refuses(
    monkeypatch: pytest.MonkeyPatch, error: int, expected: type[Exception]
) -> None:
    """Item 12: EAI_AGAIN and other failures of the lookup itself mean 'not now' (503 at
    submit, a retry at delivery); only 'no such name' refuses."""

    def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise socket.gaierror(error, "test")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    resolver = SystemResolver(threads=1, timeout_s=5)
    try:
        with pytest.raises(expected):
            await resolver("hooks.example.com", 443)
    finally:
        resolver.close()


async def test_a_slow_lookup_answers_within_its_deadline_and_concurrent_ones_share_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 13: a hanging resolver costs a caller at most the deadline, and twenty requests for
    one name make one lookup, not twenty threads' worth."""
    release = threading.Event()
    calls: list[str] = []

    def hanging(host: str, *_args: Any, **_kwargs: Any) -> Any:
        calls.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "test")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    resolver = SystemResolver(threads=2, timeout_s=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            *(resolver("slow.example", 443) for _ in range(20)), return_exceptions=True
        )
        elapsed_s = loop.time() - started
    finally:
        release.set()
        resolver.close()

    assert all(isinstance(r, ResolutionUnavailable) for r in results)
    assert calls == ["slow.example"]
    assert elapsed_s < 5  # bounded by the 0.3 s deadline, not by the 10 s the lookup hangs


async def test_given_lookup_threads_held_by_slow_names_then_known_hosts_resolve_and_others_answer_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review item 4: lookups past their deadline kept their threads and queued behind them
    without bound, so a few slow random names a second made every callback URL answer 503
    after the full deadline. Answers are now kept a while, and a lookup that finds every
    thread taken answers 'try later' at once."""
    release = threading.Event()

    def slow_for_random_names(host: str, port: Any, *_args: Any, **_kwargs: Any) -> Any:
        if host != "hooks.example.com":
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "test")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_for_random_names)
    resolver = SystemResolver(threads=2, timeout_s=0.3)
    try:
        assert await resolver("hooks.example.com", 443) == [ipaddress.ip_address("93.184.216.34")]
        slow = [resolver(f"r{n}.attacker.example", 443) for n in range(2)]
        assert all(
            isinstance(r, ResolutionUnavailable) for r in await asyncio.gather(*slow, return_exceptions=True)
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        known = await resolver("hooks.example.com", 443)
        with pytest.raises(ResolutionUnavailable, match="busy"):
            await resolver("new.example.com", 443)
        elapsed_s = loop.time() - started
    finally:
        release.set()
        resolver.close()

    assert known == [ipaddress.ip_address("93.184.216.34")]
    assert elapsed_s < 0.1  # not the 0.3 s deadline behind the slow names
