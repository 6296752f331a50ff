"""Property-based tests (hypothesis) over the callback-URL guard and the request decoder,
and schemathesis against the running ingress's own /openapi.json: any input ends in an
accepted value or a documented 4xx, never an exception or a 5xx (hardening issue)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from broker.client import Broker
from ingress.json_budget import _OBJECTS_AS_ARRAYS, _OTHER_BYTES, _STRING, JsonBudget, _structure_pieces
from ingress.openapi import openapi_document
from ingress.problems import Problem
from ingress.request_body import JobRequest, decode_job_request
from loadgen.measurement import forget_records
from model_catalogue.catalogue import load_catalogue
from object_store.store import StoreSettings
from policies.callback_guard import (
    AllowList,
    CallbackTarget,
    CallbackUrlRejected,
    IPAddress,
    check_callback_url,
)
from settings.environment import Environment

ADDRESSES = [
    ipaddress.ip_address(a) for a in ("93.184.216.34", "10.0.0.1", "127.0.0.1", "169.254.169.254", "::1")
]


async def _fixed_dns(host: str, port: int) -> list[IPAddress]:
    """Deterministic answers, no network: the host's hash picks public or private."""
    return [ADDRESSES[hash(host) % len(ADDRESSES)]]


url_parts = st.fixed_dictionaries(
    {
        "scheme": st.sampled_from(["http", "https", "ftp", "HTTP", "", "javascript"]),
        "userinfo": st.sampled_from(["", "user@", "u:p@", "@"]),
        "host": st.one_of(
            st.text(min_size=0, max_size=70),
            st.from_regex(r"[a-z0-9-]{1,64}(\.[a-z0-9-]{0,64}){0,4}\.?", fullmatch=True),
            st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
        ),
        "port": st.one_of(
            st.just(""),
            st.integers(-5, 70000).map(lambda p: f":{p}"),
            st.text(max_size=6).map(lambda t: ":" + t),
        ),
        "path": st.text(max_size=40),
    }
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        url_parts.map(lambda u: f"{u['scheme']}://{u['userinfo']}{u['host']}{u['port']}/{u['path']}"),
    )
)
async def test_any_callback_url_is_accepted_or_refused_with_a_reason_never_an_exception(url: str) -> None:
    try:
        target = await check_callback_url(url, AllowList.parse(["127.0.0.1"]), _fixed_dns)
    except CallbackUrlRejected as exc:
        assert str(exc)
        return
    assert isinstance(target, CallbackTarget)
    assert target.scheme in ("http", "https") and 0 < target.port < 65536
    assert all(0x20 < ord(c) < 0x7F for c in target.host + target.path_and_query)  # what goes on the wire


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.sampled_from(["input", "callback_url", "priority", "metadata", "ttl_s", "extra"]),
            json_values,
            max_size=6,
        ).map(lambda d: json.dumps(d).encode()),
        st.integers(1, 3000).map(
            lambda depth: b'{"input": ' + b"[" * depth + b"]" * depth + b', "callback_url": "x"}'
        ),
    )
)
def test_any_body_decodes_to_a_job_request_or_a_documented_4xx(body: bytes) -> None:
    try:
        decoded = decode_job_request(body, JsonBudget())
    except Problem as problem:
        assert problem.status in (400, 413, 422)
        return
    assert isinstance(decoded, JobRequest)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        json_values.map(lambda value: json.dumps(value).encode()),
        st.lists(st.sampled_from([b'"', b"\\", b"[", b"]", b"{", b"}", b",", b"a"]), max_size=60).map(
            b"".join
        ),
    ),
    st.integers(1, 9),
)
def test_the_budget_measured_slice_by_slice_equals_the_whole_body_measured_at_once(
    body: bytes, slice_bytes: int
) -> None:
    """A large body is measured a slice at a time (the event loop gets a turn between
    slices): whatever the body, valid JSON or not, the figures are the whole body's."""
    whole = _STRING.sub(b"", body).translate(_OBJECTS_AS_ARRAYS, _OTHER_BYTES)

    assert b"".join(_structure_pieces(body, slice_bytes)) == whole


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def ingress_url(amqp_url: str, object_store: StoreSettings) -> Iterator[str]:
    """A real ingress process under its own queue prefix, uploads to a real store; its
    topology is deleted afterwards."""
    port = _free_port()
    prefix = f"fuzz{uuid.uuid4().hex[:8]}."
    env = {
        **os.environ,
        "AMQP_URL": amqp_url,
        "QUEUE_PREFIX": prefix,
        "MODELS": "echo",
        "INGRESS_PORT": str(port),
        "CALLBACK_ALLOW_HOSTS": "127.0.0.1",
        # Random host names meet a DNS that may not answer here: give up on them quickly.
        "DNS_TIMEOUT_S": "0.3",
        "S3_ENDPOINT_URL": object_store.endpoint_url,
        "S3_BUCKET": object_store.bucket,
        "S3_ACCESS_KEY_ID": object_store.access_key_id or "",
        "S3_SECRET_ACCESS_KEY": object_store.secret_access_key or "",
    }
    env.pop("API_KEYS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ingress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the ingress did not become ready at {url}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        _delete_topology(amqp_url, prefix)


def _delete_topology(amqp_url: str, prefix: str) -> None:
    async def delete() -> None:
        read = Environment.read({"QUEUE_PREFIX": prefix, "MODELS": "echo"})
        broker = Broker(amqp_url, read.topology(), read.served_models)
        await broker.connect()
        try:
            await broker.delete_topology()
        finally:
            await broker.close()
        if read.records_url is not None:
            await forget_records(read.records_url, prefix)  # the records and counters it wrote

    asyncio.run(delete())


# The document the ingress serves at /openapi.json (the test below checks they are equal):
# loaded at import, since schemathesis's lazy fixture loading does not run on pytest 9.
schema = schemathesis.openapi.from_dict(openapi_document(("echo",), load_catalogue()))


def test_the_served_openapi_document_is_the_one_fuzzed(ingress_url: str) -> None:
    served = httpx.get(f"{ingress_url}/openapi.json", timeout=5).json()
    assert served == json.loads(json.dumps(openapi_document(("echo",), load_catalogue())))


@schemathesis.check
def no_server_error_but_dns(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case[Any]
) -> bool | None:
    """No 5xx, except the documented 503 for a callback host whose DNS did not answer in
    time (an outside dependency, like the broker; generated host names are real names
    that this machine may not be able to resolve)."""
    if (
        response.status_code == 503
        and "dns-unavailable" in response.text
        and response.headers.get("retry-after")
    ):
        return None
    return not_a_server_error(ctx, response, case)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case[Any], ingress_url: str) -> None:
    case.call_and_validate(base_url=ingress_url, checks=[no_server_error_but_dns])
