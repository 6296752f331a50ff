"""The ingress ASGI app: `create_app(settings)`; the broker client lives in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.client import Broker, BrokerUnavailable, TopologyMismatch, TopologyMissing, redact_url
from ingress.auth import authenticate, require_model
from ingress.batch_submission import submit_batch
from ingress.job_checks import check_callback, check_input_url, checked_job, served_model
from ingress.job_routes import cancel_job, get_job
from ingress.job_submission import Submission, accept
from ingress.openapi import openapi_document
from ingress.problems import Problem, handle_http_exception, handle_problem
from ingress.request_body import (
    decode_job_request,
)
from ingress.request_headers import preferred_wait_s, request_fingerprint
from ingress.settings import IngressSettings
from ingress.state import IngressState, ingress_state
from ingress.submission_route import handle_submission, submission_request
from ingress.uploads import check_uploaded, create_upload
from object_store.expiry import ExpirySweeper
from tenants.registry import Tenant
from wire.envelope import Job
from wire.job_message import with_input_bytes
from wire.outgoing import OutgoingMessage

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


# Bodies larger than this are decoded, checked and encoded in a worker thread, at most
# LARGE_DECODES_AT_ONCE at a time: the event loop keeps serving, and what decoding costs in
# memory (up to about 15x the body within the JSON budget) is held by few requests at once.
OFF_LOOP_BODY_BYTES = 64 * 1024


async def submit_job(request: Request) -> Response:
    return await handle_submission(request, _submission, accept)


async def _submission(request: Request, state: IngressState) -> Submission:
    """The request checked, cheapest first, its job encoded: nothing is written or queued
    before every check passed. The body and the decoded input end with this frame."""
    start = await submission_request(request, state, state.settings.max_body_bytes, "MAX_BODY_BYTES")
    wait_s = preferred_wait_s(request)
    try:
        if len(start.body) > OFF_LOOP_BODY_BYTES:
            async with state.large_decodes:
                job, message = await asyncio.to_thread(_decoded, state, start.model, start.tenant, start.body)
        else:
            job, message = _decoded(state, start.model, start.tenant, start.body)
        await check_callback(state, job.callback_url)
        if job.input_ref is not None:
            message = with_input_bytes(message, await check_uploaded(state, job.input_ref))
        if job.input_url is not None:
            await check_input_url(state, job.input_url)
            message = with_input_bytes(message, state.settings.upload_max_bytes)
    except BaseException:
        start.reservation.release()
        raise
    return Submission(
        job=job,
        tenant=start.tenant,
        message=message,
        reservation=start.reservation,
        wait_s=wait_s,
        key=start.key,
        fingerprint="" if start.key is None else request_fingerprint(start.model, start.body),
    )


def _decoded(state: IngressState, model: str, tenant: Tenant, body: bytes) -> tuple[Job, OutgoingMessage]:
    """The body decoded and checked, and its job encoded (without its input: the message
    carries it, so the decoded input is let go here)."""
    return checked_job(state, model, tenant, decode_job_request(body, state.settings.json_budget))


async def list_models(request: Request) -> Response:
    state = ingress_state(request)
    tenant = authenticate(request, state.settings.tenants)
    return JSONResponse(
        {
            "models": [
                {"name": model, "description": state.catalogue.entry(model).description}
                for model in state.settings.models
                if tenant.models is None or model in tenant.models
            ]
        }
    )


async def describe_model(request: Request) -> Response:
    state = ingress_state(request)
    tenant = authenticate(request, state.settings.tenants)
    model = served_model(state, request.path_params["model"])
    require_model(tenant, model)
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
        if settings.tenants.auth_off:
            logger.warning("API_KEYS is empty: AUTHENTICATION IS OFF, anyone can submit jobs")
        connecting = asyncio.create_task(_connect_until_ready(state.broker, settings.amqp_url))
        async with contextlib.AsyncExitStack() as stack:
            if state.uploads is not None:
                await stack.enter_async_context(state.uploads)
                sweeper = ExpirySweeper(state.uploads, settings.result_ttl_s, settings.store_sweep_interval_s)
                sweeper.start()
                stack.push_async_callback(sweeper.close)
            try:
                yield
            finally:
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                await state.demand.close()
                await state.singles.close()
                await state.broker.close()
                await state.close()
                state.resolver.close()

    app = Starlette(
        routes=[
            Route("/v1/models/{model}/jobs", submit_job, methods=["POST"]),
            Route("/v1/models/{model}/jobs/batch", submit_batch, methods=["POST"]),
            Route("/v1/uploads", create_upload, methods=["POST"]),
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
