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

from contract.broker import Broker, BrokerUnavailable, TopologyMismatch, TopologyMissing, redact_url
from contract.callback_guard import CallbackUrlRejected, ResolutionUnavailable, check_callback_url
from contract.envelope import Job
from ingress.auth import authenticate
from ingress.job_routes import cancel_job, get_job
from ingress.job_submission import accept, accept_once
from ingress.openapi import openapi_document
from ingress.problems import Problem, handle_http_exception, handle_problem
from ingress.request_body import decode_job_request, read_limited_body, require_json_content_type
from ingress.request_headers import idempotency_key, preferred_wait_s, request_fingerprint
from ingress.settings import IngressSettings
from ingress.state import IngressState, ingress_state

logger = logging.getLogger(__name__)

BROKER_RETRY_INTERVAL_S = 1.0
TOPOLOGY_RETRY_INTERVAL_S = 10.0


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
        except (TopologyMismatch, TopologyMissing) as exc:
            logger.error(
                "cannot use the broker's queues, retrying in %.0f s: %s", TOPOLOGY_RETRY_INTERVAL_S, exc
            )
            await asyncio.sleep(TOPOLOGY_RETRY_INTERVAL_S)


async def submit_job(request: Request) -> Response:
    state = ingress_state(request)
    settings = state.settings
    try:
        owner = authenticate(request, settings.api_keys)
        model = request.path_params["model"]
        if model not in settings.models:
            raise Problem(
                404,
                "unknown-model",
                "Not Found",
                f"model {model!r} is not served; served models: {list(settings.models)}",
            )
        require_json_content_type(request)
        body = await read_limited_body(request, settings.max_body_bytes)
        job_request = decode_job_request(body)
        _check_input(state, model, job_request.input)
        key = idempotency_key(request)
        wait_s = preferred_wait_s(request)
        if job_request.callback_url is not None:
            await _check_callback_url(state, job_request.callback_url)
        elif state.records is None:
            raise Problem(
                422,
                "callback-url-required",
                "Unprocessable Content",
                "callback_url is required here: job records are off (REDIS_URL=off), so a result "
                "could not be polled or waited for",
                errors=[{"field": "callback_url", "detail": "required when REDIS_URL=off"}],
            )
        submitted_at_ms = int(time.time() * 1000)
        # The request's ttl_s, else the model's default (models.yaml `jobs.default_ttl_s`).
        ttl_s = (
            job_request.ttl_s
            if job_request.ttl_s is not None
            else state.catalogue.entry(model).jobs.default_ttl_s
        )
        job = Job(
            id=str(uuid.uuid4()),
            model=model,
            input=job_request.input,
            callback_url=job_request.callback_url,
            priority=job_request.priority,
            metadata=job_request.metadata,
            submitted_at_ms=submitted_at_ms,
            deadline_ms=None if ttl_s is None else submitted_at_ms + round(ttl_s * 1000),
            owner=owner,
        )
        if key is None:
            return await accept(state, job, wait_s)
        return await accept_once(state, job, key, request_fingerprint(model, body), wait_s)
    except Problem as problem:
        state.metrics.requests_rejected.labels(str(problem.status)).inc()
        raise


def _check_input(state: IngressState, model: str, job_input: object) -> None:
    """The model's input schema (models.yaml), before anything is queued."""
    problem = state.input_schemas.problem(model, job_input)
    if problem is not None:
        pointer, message = problem
        raise Problem(
            422,
            "invalid-input",
            "Unprocessable Content",
            f"input does not match {model}'s input schema at {pointer}: {message}",
            errors=[{"pointer": pointer, "detail": message}],
        )


async def _check_callback_url(state: IngressState, callback_url: str) -> None:
    try:
        await check_callback_url(callback_url, state.settings.callback_allow, state.resolver)
    except CallbackUrlRejected as exc:
        raise Problem(
            422,
            "invalid-callback-url",
            "Unprocessable Content",
            str(exc),
            errors=[{"field": "callback_url", "detail": str(exc)}],
        ) from exc
    except ResolutionUnavailable as exc:
        raise state.unavailable("dns-unavailable", f"{exc}; the URL may be fine: retry later") from exc


async def list_models(request: Request) -> Response:
    state = ingress_state(request)
    authenticate(request, state.settings.api_keys)
    return JSONResponse(
        {
            "models": [
                {"name": model, "description": state.catalogue.entry(model).description}
                for model in state.settings.models
            ]
        }
    )


async def describe_model(request: Request) -> Response:
    state = ingress_state(request)
    authenticate(request, state.settings.api_keys)
    model = request.path_params["model"]
    if model not in state.settings.models:
        raise Problem(
            404,
            "unknown-model",
            "Not Found",
            f"model {model!r} is not served; served models: {list(state.settings.models)}",
        )
    entry = state.catalogue.entry(model)
    return JSONResponse({"name": model, "description": entry.description, "input_schema": entry.input_schema})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    if not ingress_state(request).broker.is_ready:
        raise Problem(
            503, "not-ready", "Service Unavailable", "not connected to RabbitMQ", headers={"Retry-After": "1"}
        )
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(ingress_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    state = ingress_state(request)
    return Response(
        msgspec.json.encode(openapi_document(state.settings.models, state.catalogue)),
        media_type="application/json",
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
            await state.close()
            state.resolver.close()

    app = Starlette(
        routes=[
            Route("/v1/models/{model}/jobs", submit_job, methods=["POST"]),
            Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
            Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model}", describe_model, methods=["GET"]),
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
