"""The KEDA external push scaler: its demand window with a fake clock, its gRPC service
over real gRPC against KEDA's own service definition, and the whole path from a job
accepted by the ingress to KEDA's stream saying "active"."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from broker.client import Broker
from ingress.settings import IngressSettings
from push_scaler import externalscaler_pb2 as pb
from push_scaler import externalscaler_pb2_grpc as pb_grpc
from push_scaler.__main__ import _subscribe_until_ready
from push_scaler.demand_window import DemandWindow
from push_scaler.scaler_service import DemandScaler, serve
from tests.conftest import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.mark.parametrize(
    ("demand_at_s", "asked_at_s", "active"),
    [
        ([], 0.0, False),
        ([0.0], 0.0, True),
        ([0.0], 9.9, True),
        ([0.0], 10.0, False),
        ([0.0, 8.0], 17.9, True),  # each event restarts the window
        ([0.0, 8.0], 18.0, False),
    ],
)
def test_demand_keeps_a_model_active_for_the_window(
    demand_at_s: list[float], asked_at_s: float, active: bool
) -> None:
    clock = FakeClock()
    window = DemandWindow(active_for_s=10.0, clock=clock)
    start = clock.now_s
    for at_s in demand_at_s:
        clock.now_s = start + at_s
        window.record("echo")
    clock.now_s = start + asked_at_s

    assert window.is_active("echo") is active
    assert window.is_active("embed-minilm") is False


def test_record_says_whether_the_model_just_became_active() -> None:
    clock = FakeClock()
    window = DemandWindow(active_for_s=10.0, clock=clock)

    assert window.record("echo") is True
    assert window.record("echo") is False
    clock.now_s += 10.0
    assert window.record("echo") is True


def _stub(channel: grpc.aio.Channel) -> pb_grpc.ExternalScalerStub:
    return pb_grpc.ExternalScalerStub(channel)  # type: ignore[no-untyped-call]  # generated, untyped


def _ref(model: str | None = "echo") -> pb.ScaledObjectRef:
    metadata = {} if model is None else {"model": model}
    return pb.ScaledObjectRef(name=f"worker-{model}", namespace="inferq", scalerMetadata=metadata)


@pytest.fixture
async def scaler() -> AsyncIterator[tuple[DemandScaler, pb_grpc.ExternalScalerStub]]:
    service = DemandScaler(DemandWindow(active_for_s=0.5), ("echo", "embed-minilm"), max_streams=2)
    server, port = await serve(service, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield service, _stub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_given_demand_then_is_active_and_metrics_say_so_over_grpc(
    scaler: tuple[DemandScaler, pb_grpc.ExternalScalerStub],
) -> None:
    service, stub = scaler
    spec = await stub.GetMetricSpec(_ref())
    before = await stub.IsActive(_ref())
    idle_metrics = await stub.GetMetrics(
        pb.GetMetricsRequest(scaledObjectRef=_ref(), metricName="demand-echo")
    )
    service.on_demand("echo")
    after = await stub.IsActive(_ref())
    busy_metrics = await stub.GetMetrics(
        pb.GetMetricsRequest(scaledObjectRef=_ref(), metricName="demand-echo")
    )
    other = await stub.IsActive(_ref("embed-minilm"))

    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [
        ("demand-echo", 1, 1.0)
    ]
    assert (before.result, after.result, other.result) == (False, True, False)
    assert [(m.metricName, m.metricValue) for m in idle_metrics.metricValues] == [("demand-echo", 0)]
    assert [(m.metricName, m.metricValueFloat) for m in busy_metrics.metricValues] == [("demand-echo", 1.0)]


async def test_stream_is_active_pushes_the_state_then_each_change(
    scaler: tuple[DemandScaler, pb_grpc.ExternalScalerStub],
) -> None:
    service, stub = scaler
    stream = stub.StreamIsActive(_ref())
    updates: list[bool] = []

    async def next_update() -> bool:
        update = await asyncio.wait_for(stream.read(), 5)
        assert update is not grpc.aio.EOF
        return bool(update.result)

    updates.append(await next_update())  # the current state, at once
    service.on_demand("echo")
    updates.append(await next_update())  # pushed on the event, not polled
    updates.append(await next_update())  # the window (0.5 s) ran out
    stream.cancel()

    assert updates == [False, True, False]


async def test_a_trigger_without_model_metadata_is_refused_naming_it(
    scaler: tuple[DemandScaler, pb_grpc.ExternalScalerStub],
) -> None:
    _service, stub = scaler
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IsActive(_ref(None))

    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "needs metadata `model`" in str(refused.value.details())


async def test_given_a_job_accepted_by_the_ingress_then_keda_hears_active_at_once_from_every_replica(
    ingress_settings: IngressSettings, client: httpx.AsyncClient
) -> None:
    """Two push scalers (the cluster runs two, cluster finding 12), each on a queue of its
    own: whichever KEDA's stream reaches hears the demand (sharing one queue, each heard part)."""
    services, servers, brokers, channels, streams = [], [], [], [], []
    try:
        for instance in ("push-scaler-a", "push-scaler-b"):
            service = DemandScaler(DemandWindow(active_for_s=30.0), ingress_settings.models)
            server, port = await serve(service, "127.0.0.1", 0)
            broker = Broker(ingress_settings.amqp_url, ingress_settings.topology, ingress_settings.models)
            services.append(service)
            servers.append(server)
            brokers.append(broker)
            await _subscribe_until_ready(broker, service, ingress_settings.amqp_url, instance)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
            streams.append(_stub(channels[-1]).StreamIsActive(_ref()))
        firsts = [await asyncio.wait_for(stream.read(), 5) for stream in streams]
        accepted = await client.post("/v1/models/echo/jobs", json={"input": 1})
        started = asyncio.get_running_loop().time()
        woke = [await asyncio.wait_for(stream.read(), 5) for stream in streams]
        waited_s = asyncio.get_running_loop().time() - started
        for stream in streams:
            stream.cancel()
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(0)
        for broker in brokers:
            await broker.close()

    assert accepted.status_code == 202
    assert [f.result for f in firsts] == [False, False]
    assert [w.result for w in woke] == [True, True]
    assert waited_s < 2.0  # the event path (coalesced 0.25 s), not a polling interval
    print(f"\npush scalers: job accepted -> both KEDA streams active in {waited_s * 1000:.0f} ms")


async def test_a_model_not_served_is_refused_and_leaves_nothing_behind(
    scaler: tuple[DemandScaler, pb_grpc.ExternalScalerStub],
) -> None:
    """Budgets issue, review item 18: the scaler kept state for any model name a caller or a
    demand event named."""
    service, stub = scaler
    service.on_demand("x" * 10_000)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IsActive(_ref("not-a-model"))

    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not served" in str(refused.value.details())
    assert not (await stub.IsActive(_ref("echo"))).result


async def test_streams_past_the_bound_are_refused_and_a_closed_one_frees_its_place(
    scaler: tuple[DemandScaler, pb_grpc.ExternalScalerStub],
) -> None:
    _service, stub = scaler
    streams = [stub.StreamIsActive(_ref()) for _ in range(2)]
    for stream in streams:
        await asyncio.wait_for(stream.read(), 5)
    third = stub.StreamIsActive(_ref())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await asyncio.wait_for(third.read(), 5)
    streams[0].cancel()

    async def a_stream_opens() -> bool:
        again = stub.StreamIsActive(_ref())
        try:
            await asyncio.wait_for(again.read(), 5)
            return True
        except grpc.aio.AioRpcError:
            return False
        finally:
            again.cancel()

    await wait_until(a_stream_opens, 10, "a place freed by the closed stream")
    streams[1].cancel()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
