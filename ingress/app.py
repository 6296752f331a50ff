"""The ingress ASGI app: `create_app(settings)`; the broker client lives in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contract.broker import (
    Broker,
    BrokerError,
    BrokerUnavailable,
    PublishRejected,
    TopologyMismatch,
    redact_url,
)
from contract.callback_guard import (
    CallbackUrlRejected,
    ResolutionUnavailable,
    SystemResolver,
    check_callback_url,
)
from contract.envelope import Job
from contract.job_message import job_message
from ingress.admission import Admission, QueueFull
from ingress.auth import authenticate
from ingress.demand import DemandAnnouncer
from ingress.metrics import IngressMetrics
from ingress.openapi import openapi_document
from ingress.problems import Problem, handle_http_exception, handle_problem
from ingress.request_body import decode_job_request, read_limited_body, require_json_content_type
from ingress.settings import IngressSettings

logger = logging.getLogger(__name__)

BROKER_RETRY_INTERVAL_S = 1.0
TOPOLOGY_RETRY_INTERVAL_S = 10.0


class IngressState:
    """What handlers share: settings, the broker client and metrics."""

    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self.broker = Broker(settings.amqp_url, settings.topology, settings.models, role="ingress")
        self.metrics = IngressMetrics()
        self.resolver = SystemResolver(timeout_s=settings.dns_timeout_s)
        self.admission = Admission(self._queue_depth, settings.topology.max_queue_length)
        self.demand = DemandAnnouncer(self.broker)

    async def _queue_depth(self, model: str) -> int:
        ready, _consumers = await self.broker.queue_depth(self.settings.topology.main_queue(model))
        return ready


async def _connect_until_ready(broker: Broker, url: str) -> None:
    """The first connection may fail (broker still starting); robust reconnects take over after."""
    while True:
        try:
            await broker.connect()
            logger.info("connected to RabbitMQ at %s; topology declared", redact_url(url))
            return
        except BrokerUnavailable as exc:
            logger.warning("broker not ready, retrying in %.0f s: %s", BROKER_RETRY_INTERVAL_S, exc)
            await asyncio.sleep(BROKER_RETRY_INTERVAL_S)
        except TopologyMismatch as exc:
            logger.error(
                "cannot use the broker's queues, retrying in %.0f s: %s", TOPOLOGY_RETRY_INTERVAL_S, exc
            )
            await asyncio.sleep(TOPOLOGY_RETRY_INTERVAL_S)


def _state(request: Request) -> IngressState:
    state: IngressState = request.app.state.ingress
    return state


async def submit_job(request: Request) -> Response:
    state = _state(request)
    settings = state.settings
    try:
        authenticate(request, settings.api_keys)
        model = request.path_params["model"]
        if model not in settings.models:
            raise Problem(
                404,
                "unknown-model",
                "Not Found",
                f"model {model!r} is not served; served models: {list(settings.models)}",
            )
        require_json_content_type(request)
        job_request = decode_job_request(await read_limited_body(request, settings.max_body_bytes))
        try:
            await check_callback_url(job_request.callback_url, settings.callback_allow, state.resolver)
        except CallbackUrlRejected as exc:
            raise Problem(
                422,
                "invalid-callback-url",
                "Unprocessable Content",
                str(exc),
                errors=[{"field": "callback_url", "detail": str(exc)}],
            ) from exc
        except ResolutionUnavailable as exc:
            raise _unavailable(state, "dns-unavailable", f"{exc}; the URL may be fine: retry later") from exc
        submitted_at_ms = int(time.time() * 1000)
        job = Job(
            id=str(uuid.uuid4()),
            model=model,
            input=job_request.input,
            callback_url=job_request.callback_url,
            priority=job_request.priority,
            metadata=job_request.metadata,
            submitted_at_ms=submitted_at_ms,
            deadline_ms=None
            if job_request.ttl_s is None
            else submitted_at_ms + round(job_request.ttl_s * 1000),
        )
        await _publish(state, job)
    except Problem as problem:
        state.metrics.requests_rejected.labels(str(problem.status)).inc()
        raise
    state.metrics.jobs_accepted.labels(model, job.priority).inc()
    state.demand.announce(model)
    return JSONResponse(
        {"id": job.id, "model": model, "status": "queued", "priority": job.priority}, status_code=202
    )


async def _publish(state: IngressState, job: Job) -> None:
    """Admit the job under MAX_QUEUE_LENGTH, publish it, and wait for the broker's confirm;
    anything short of a confirm is a 503 with Retry-After (nothing was accepted)."""
    started = time.monotonic()
    try:
        await state.admission.admit(job.model)
        try:
            await state.broker.publish(
                job_message(job),
                job.model,
                exchange=state.settings.topology.jobs_exchange,
                timeout_s=state.settings.publish_timeout_s,
            )
        except BrokerError:
            state.admission.refund(job.model)
            raise
    except QueueFull as exc:
        raise _unavailable(state, "queue-full", f"{exc}; retry later") from exc
    except PublishRejected as exc:
        logger.warning("job %s not taken by the broker: %s", job.id, exc)
        raise _unavailable(state, "not-queued", f"the broker did not take the job: {exc}") from exc
    except BrokerUnavailable as exc:
        logger.warning("job %s not published, broker unavailable: %s", job.id, exc)
        raise _unavailable(state, "broker-unavailable", "the job queue is unavailable; retry later") from exc
    state.metrics.publish_seconds.observe(time.monotonic() - started)


def _unavailable(state: IngressState, slug: str, detail: str) -> Problem:
    retry_after = {"Retry-After": str(state.settings.retry_after_s)}
    return Problem(503, slug, "Service Unavailable", detail, headers=retry_after)


async def list_models(request: Request) -> Response:
    settings = _state(request).settings
    authenticate(request, settings.api_keys)
    return JSONResponse({"models": [{"name": model} for model in settings.models]})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if not _state(request).broker.is_ready:
        raise Problem(
            503, "not-ready", "Service Unavailable", "not connected to RabbitMQ", headers={"Retry-After": "1"}
        )
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return Response(
        msgspec.json.encode(openapi_document(_state(request).settings.models)), media_type="application/json"
    )


def create_app(settings: IngressSettings) -> Starlette:
    state = IngressState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not settings.api_keys:
            logger.warning("API_KEYS is empty: AUTHENTICATION IS OFF, anyone can submit jobs")
        connecting = asyncio.create_task(_connect_until_ready(state.broker, settings.amqp_url))
        try:
            yield
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
            await state.demand.close()
            await state.broker.close()
            state.resolver.close()

    app = Starlette(
        routes=[
            Route("/v1/models/{model}/jobs", submit_job, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={Problem: handle_problem, HTTPException: handle_http_exception},
        lifespan=lifespan,
    )
    app.state.ingress = state
    return app
