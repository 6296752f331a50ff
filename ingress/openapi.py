"""The OpenAPI description of the public HTTP contract, served at /openapi.json."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM}}}


def openapi_document(models: tuple[str, ...]) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "inferq ingress", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobRequest": {
                    "type": "object",
                    "required": ["input", "callback_url"],
                    "additionalProperties": False,
                    "properties": {
                        "input": {"description": "Any JSON value; the model defines its shape"},
                        "callback_url": {"type": "string", "format": "uri"},
                        "priority": {"enum": ["high", "normal", "low"], "default": "normal"},
                        "metadata": {"type": "object", "description": "Echoed back in the callback"},
                        "ttl_s": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "description": "Not run after this many seconds; the callback is job.expired",
                        },
                    },
                },
                "JobAccepted": {
                    "type": "object",
                    "required": ["id", "model", "status", "priority"],
                    "properties": {
                        "id": {"type": "string"},
                        "model": {"type": "string"},
                        "status": {"const": "queued"},
                        "priority": {"enum": ["high", "normal", "low"]},
                    },
                },
                "Problem": {
                    "type": "object",
                    "description": "RFC 9457 problem details",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/models/{model}/jobs": {
                "post": {
                    "summary": "Submit a job; the result arrives by signed callback",
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": {"enum": list(models)}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Confirmed by the broker and queued",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}
                            },
                        },
                        "400": _problem_response("Malformed JSON"),
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown model"),
                        "413": _problem_response("Body over MAX_BODY_BYTES"),
                        "415": _problem_response("Content-Type is not JSON"),
                        "422": _problem_response("Schema violation or refused callback_url"),
                        "503": _problem_response(
                            "Broker unavailable or did not take the job; see Retry-After"
                        ),
                    },
                }
            },
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "OK"}}}},
            "/healthz": {
                "get": {
                    "summary": "Process alive",
                    "security": [],
                    "responses": {"200": {"description": "OK"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Broker connected, topology declared",
                    "security": [],
                    "responses": {"200": {"description": "Ready"}, "503": _problem_response("Not ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "OK"}},
                }
            },
        },
    }
