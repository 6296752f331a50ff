"""KEDA's external scaler gRPC service (`externalscaler.proto`), answered from demand events.

KEDA calls it for each ScaledObject whose trigger is `external-push` with metadata
`scalerAddress` and `model`:

    IsActive        whether the model had demand in the last PUSH_SCALER_ACTIVE_S
    StreamIsActive  the same, pushed: the current state at once, then every change (a
                    demand event makes it true at once, the window's end false)
    GetMetricSpec   one metric, `demand-<model>`, target 1
    GetMetrics      1 while active, else 0: with target 1 this trigger asks for one
                    replica; the rabbitmq trigger beside it asks for more

A request without `model` in its metadata, or naming a model that is not served, is
INVALID_ARGUMENT, naming what is expected: what the service keeps is per served model,
never per name a caller sends. Streams are bounded (MAX_STREAMS; past it
RESOURCE_EXHAUSTED), and so are request size and concurrent calls per connection. The
service has no authentication of its own: it answers only "is this model active", and
in a cluster the NetworkPolicy admits KEDA's operator alone (cluster/base/push-scaler.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from push_scaler import externalscaler_pb2 as pb
from push_scaler import externalscaler_pb2_grpc as pb_grpc
from push_scaler.demand_window import DemandWindow

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


MAX_STREAMS = 64
MAX_REQUEST_BYTES = 64 * 1024


class DemandScaler(pb_grpc.ExternalScalerServicer):
    def __init__(self, window: DemandWindow, models: tuple[str, ...], max_streams: int = MAX_STREAMS) -> None:
        self._window = window
        self._models = frozenset(models)
        self._max_streams = max_streams
        self._streams = 0
        self._changed: dict[str, asyncio.Event] = {}

    def on_demand(self, model: str) -> None:
        """A demand event: the model is active now; streams hear it if it was not."""
        if model not in self._models:
            return  # another deployment's model on a shared broker: nothing to keep for it
        if self._window.record(model):
            logger.info("demand for %s: active", model)
            self._notify(model)

    def _notify(self, model: str) -> None:
        event = self._changed.pop(model, None)
        if event is not None:
            event.set()

    async def IsActive(self, request: pb.ScaledObjectRef, context: Context) -> pb.IsActiveResponse:
        model = await self._model_of(request, context)
        return pb.IsActiveResponse(result=self._window.is_active(model))

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: Context
    ) -> AsyncIterator[pb.IsActiveResponse]:
        model = await self._model_of(request, context)
        if self._streams >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._streams} streams are open, the most this scaler serves; retry later",
            )
        self._streams += 1
        try:
            # Armed before each state is read and sent: a generator resumes only after the
            # client took what it yielded, and demand arriving in between must not be missed.
            changed = self._changed.setdefault(model, asyncio.Event())
            active = self._window.is_active(model)
            yield pb.IsActiveResponse(result=active)
            while True:
                # Wake on new demand, or when the window runs out while active.
                timeout_s = self._window.remaining_s(model) if active else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout_s)
                changed = self._changed.setdefault(model, asyncio.Event())
                now_active = self._window.is_active(model)
                if now_active != active:
                    active = now_active
                    yield pb.IsActiveResponse(result=active)
        finally:
            self._streams -= 1

    async def GetMetricSpec(self, request: pb.ScaledObjectRef, context: Context) -> pb.GetMetricSpecResponse:
        model = await self._model_of(request, context)
        spec = pb.MetricSpec(metricName=metric_name(model), targetSize=1, targetSizeFloat=1.0)
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Context) -> pb.GetMetricsResponse:
        model = await self._model_of(request.scaledObjectRef, context)
        value = 1 if self._window.is_active(model) else 0
        metric = pb.MetricValue(
            metricName=metric_name(model), metricValue=value, metricValueFloat=float(value)
        )
        return pb.GetMetricsResponse(metricValues=[metric])

    async def _model_of(self, ref: pb.ScaledObjectRef, context: Context) -> str:
        model = ref.scalerMetadata.get("model", "").strip()
        if not model:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ScaledObject {ref.namespace}/{ref.name}: the external-push trigger needs metadata "
                "`model` (the model whose demand wakes it), e.g. model: echo",
            )
        if model not in self._models:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"ScaledObject {ref.namespace}/{ref.name}: model {model[:64]!r} is not served here; "
                f"served: {sorted(self._models)}",
            )
        return model


def metric_name(model: str) -> str:
    return f"demand-{model}"


async def serve(scaler: DemandScaler, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server; returns it and the port it bound (0 picks a free one)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_concurrent_streams", MAX_STREAMS),
        ]
    )
    pb_grpc.add_ExternalScalerServicer_to_server(scaler, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound
