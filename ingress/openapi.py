"""The OpenAPI description of the public HTTP contract, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from model_catalogue.catalogue import Catalogue

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_RECORD = {"$ref": "#/components/schemas/JobRecord"}
_TIME = {"type": ["string", "null"], "format": "date-time"}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PLACEMENT = {
    "queue_position": {
        "type": "integer",
        "description": "While queued, roughly: jobs ahead of it at its priority or higher, plus itself",
    },
    "eta_s": {
        "type": ["number", "null"],
        "description": "queue_position / the model's completions per second while it worked in the "
        "last minute; null when nothing completed lately (e.g. scaled to zero)",
    },
}
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "expired", "canceled")


def _problem_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _PROBLEM}}}


def openapi_document(models: tuple[str, ...], catalogue: Catalogue) -> dict[str, Any]:
    document = _document(models)
    # Each model's input schema (models.yaml), as the ingress enforces it at submit.
    for model in models:
        document["components"]["schemas"][f"Input-{model}"] = catalogue.entry(model).input_schema
    return document


def _document(models: tuple[str, ...]) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "inferq ingress", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobRequest": {
                    "type": "object",
                    "description": "Exactly one of `input`, `input_ref` and `input_url`",
                    "oneOf": [
                        {"required": ["input"]},
                        {"required": ["input_ref"]},
                        {"required": ["input_url"]},
                    ],
                    "additionalProperties": False,
                    "properties": {
                        "input": {
                            "description": "JSON matching the model's input schema "
                            "(components/schemas/Input-<model>, GET /v1/models/{model}); else 422"
                        },
                        "input_ref": {
                            "type": "string",
                            "description": "An upload of this API key's (POST /v1/uploads) holding the "
                            "input as JSON; it must exist (else 422) and fit UPLOAD_MAX_BYTES (else 413). "
                            "The worker checks it against the model's input schema: a miss ends the job "
                            "`failed` with `invalid input`",
                        },
                        "input_url": {
                            "type": "string",
                            "format": "uri",
                            "description": "An http(s) URL the worker GETs the input from (JSON), through "
                            "the callback-URL guard (public addresses or CALLBACK_ALLOW_HOSTS; else 422 "
                            "invalid-input-url); redirects are not followed, the body may hold "
                            "UPLOAD_MAX_BYTES. A 4xx or a schema miss ends the job `failed`; a timeout, "
                            "a 5xx or a 429 retries it",
                        },
                        "input_format": {
                            "type": "string",
                            "enum": ["json", "jsonl"],
                            "default": "json",
                            "description": "`jsonl`: the input named by `input_ref` or `input_url` is "
                            "JSON Lines, one record per line (blank lines skipped), each checked against "
                            "the model's input schema; the worker streams it through the model and writes "
                            "line i of the output, the output for record i, to the object store: the "
                            "result is always `output_url`. A refused record ends the job `failed`, naming "
                            "its line. 422 with `input`, or without an object store",
                        },
                        "callback_url": {
                            "type": "string",
                            "format": "uri",
                            "description": "Where the signed result is POSTed; optional: poll or wait",
                        },
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
                        **_PLACEMENT,
                    },
                },
                "BatchRequest": {
                    "type": "object",
                    "required": ["jobs"],
                    "additionalProperties": False,
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "minItems": 1,
                            "description": "1 to BATCH_MAX_JOBS (1,000) jobs, each as POST "
                            "/v1/models/{model}/jobs takes it",
                            "items": {"$ref": "#/components/schemas/JobRequest"},
                        }
                    },
                },
                "BatchAccepted": {
                    "type": "object",
                    "required": ["jobs"],
                    "properties": {
                        "jobs": {
                            "type": "array",
                            "description": "One per job, in request order",
                            "items": {
                                "type": "object",
                                "required": ["id", "status", "priority"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "status": {"enum": list(JOB_STATUSES)},
                                    "priority": {"enum": ["high", "normal", "low"]},
                                    **_PLACEMENT,
                                },
                            },
                        }
                    },
                },
                "JobRecord": {
                    "type": "object",
                    "required": ["id", "model", "status", "priority", "attempts", "created_at", "callback"],
                    "properties": {
                        "id": {"type": "string"},
                        "model": {"type": "string"},
                        "status": {"enum": list(JOB_STATUSES)},
                        "priority": {"enum": ["high", "normal", "low"]},
                        "attempts": {"type": "integer"},
                        "metadata": {"type": "object"},
                        "created_at": _TIME,
                        "started_at": _TIME,
                        "finished_at": _TIME,
                        "output": {
                            "description": "Once succeeded: the model's output (null when it was over "
                            "RECORD_OUTPUT_MAX_BYTES: it went by callback only, see output_omitted)"
                        },
                        "output_omitted": {
                            "type": "object",
                            "properties": {"bytes": {"type": "integer"}, "reason": {"type": "string"}},
                            "description": "Present when the output was too large to keep in the record",
                        },
                        "output_url": {
                            "type": "string",
                            "format": "uri",
                            "description": "Once succeeded, instead of output when it was over "
                            "OUTPUT_INLINE_MAX_BYTES: a presigned GET of the output in the object store, "
                            "valid while the record lives",
                        },
                        "output_size": {"type": "integer", "description": "With output_url: its bytes"},
                        "output_sha256": {"type": "string", "description": "With output_url: its digest"},
                        "error": {"type": "string", "description": "Once failed, expired or canceled"},
                        "callback": {
                            "type": ["object", "null"],
                            "properties": {
                                "url": {"type": "string"},
                                "state": {"enum": ["pending", "delivered", "parked"]},
                                "attempts": {"type": "integer"},
                            },
                        },
                        **_PLACEMENT,
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
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                            "description": "Same key and body within RESULT_TTL_S return the original job "
                            "(Idempotent-Replayed: true), per API key",
                        },
                        {
                            "name": "Prefer",
                            "in": "header",
                            "schema": {"type": "string"},
                            "description": "wait=N (N <= 60): answer 200 with the final record if the job "
                            "ends within N seconds; Preference-Applied says the wait was honoured",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "Prefer: wait was given and the job ended within it",
                            "content": {"application/json": {"schema": _RECORD}},
                        },
                        "202": {
                            "description": "Confirmed by the broker and queued; Location names its record",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/JobAccepted"}}
                            },
                        },
                        "409": _problem_response(
                            "A request with this Idempotency-Key is still being accepted"
                        ),
                        "501": _problem_response("Idempotency-Key sent while job records are off"),
                        "400": _problem_response("Malformed JSON, or a Content-Length that is not a number"),
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown model"),
                        "413": _problem_response(
                            "Body over MAX_BODY_BYTES (1 MiB), more JSON values than MAX_JSON_VALUES "
                            "(200,000; `too-many-json-values`), or metadata over MAX_METADATA_BYTES "
                            "(64 KiB; `metadata-too-large`); `limit` names the setting"
                        ),
                        "403": _problem_response("The API key may not use this model (`model-not-allowed`)"),
                        "415": _problem_response("Content-Type is not JSON"),
                        "429": _problem_response(
                            "The API key's rate (`rate-limited`, Retry-After and RateLimit headers) or its "
                            "max_queued (`quota-exceeded`); nothing was queued"
                        ),
                        "422": _problem_response(
                            "Schema violation, an input its model's schema refuses (`pointer` names "
                            "the field), JSON nested deeper than MAX_JSON_DEPTH (64; `json-too-deep`), an "
                            "input whose check took over INPUT_VALIDATION_BUDGET_MS (250; "
                            "`input-too-complex`), refused callback_url, or Idempotency-Key reused with "
                            "another body"
                        ),
                        "503": _problem_response(
                            "Broker unavailable or did not take the job, job records unavailable for a "
                            "keyed request, or request bodies in flight over MAX_INFLIGHT_BODY_BYTES "
                            "(`ingress-busy`); see Retry-After"
                        ),
                    },
                }
            },
            "/v1/models/{model}/jobs/batch": {
                "post": {
                    "summary": "Submit many jobs at once, all or nothing; each is then a job of its own",
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": {"enum": list(models)}},
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                            "description": "Same key and body within RESULT_TTL_S return the original jobs "
                            "(same ids, their current status; Idempotent-Replayed: true), per API key",
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Every job confirmed by the broker and queued",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/BatchAccepted"}}
                            },
                        },
                        "400": _problem_response("Malformed JSON, or a Content-Length that is not a number"),
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown model"),
                        "409": _problem_response(
                            "A request with this Idempotency-Key is still being accepted"
                        ),
                        "413": _problem_response(
                            "Body over MAX_BATCH_BODY_BYTES (8 MiB), or more JSON values than "
                            "MAX_JSON_VALUES in the whole batch"
                        ),
                        "403": _problem_response("The API key may not use this model (`model-not-allowed`)"),
                        "415": _problem_response("Content-Type is not JSON"),
                        "429": _problem_response(
                            "The API key's rate or max_queued, each job of the batch counted; nothing queued"
                        ),
                        "422": _problem_response(
                            "Not a batch (`validation-error`), outside 1..BATCH_MAX_JOBS (`batch-size`), or "
                            "bad jobs (`invalid-jobs`: `errors` names each by JSON pointer, e.g. "
                            "/jobs/17/input/texts/0), or more jobs than the key's burst "
                            "(`batch-over-burst`); nothing was queued"
                        ),
                        "501": _problem_response("Idempotency-Key sent while job records are off"),
                        "503": _problem_response(
                            "Nothing queued (queue full, broker or records unavailable, ingress busy), or "
                            "`batch-partly-queued`: `jobs` gives each job's fate (queued, uncertain, "
                            "not-queued); see Retry-After"
                        ),
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job's record: status, times, output or error, callback delivery state",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {
                            "description": "The record",
                            "content": {"application/json": {"schema": _RECORD}},
                        },
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown, expired, or submitted with another API key"),
                        "501": _problem_response("Job records are off (REDIS_URL=off)"),
                        "503": _problem_response(
                            "Job records unavailable, or not yet written; see Retry-After"
                        ),
                    },
                }
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued job: it never runs and its callback is job.canceled",
                    "parameters": [_JOB_ID],
                    "responses": {
                        "200": {
                            "description": "Canceled; the record",
                            "content": {"application/json": {"schema": _RECORD}},
                        },
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown, expired, or submitted with another API key"),
                        "409": _problem_response("Not queued any more; `job_status` says what it is"),
                        "501": _problem_response("Job records are off (REDIS_URL=off)"),
                        "503": _problem_response("Job records unavailable; see Retry-After"),
                    },
                }
            },
            "/v1/uploads": {
                "post": {
                    "summary": "A presigned URL to PUT a large input to, straight to the object store",
                    "responses": {
                        "201": {
                            "description": "PUT the input's JSON bytes to `upload_url` before "
                            "`expires_at`, then name `input_ref` in a job",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["upload_url", "input_ref", "expires_at", "max_bytes"],
                                        "properties": {
                                            "upload_url": {"type": "string", "format": "uri"},
                                            "input_ref": {"type": "string"},
                                            "expires_at": {"type": "string", "format": "date-time"},
                                            "max_bytes": {"type": "integer"},
                                        },
                                    }
                                }
                            },
                        },
                        "401": _problem_response("Missing or wrong API key"),
                        "501": _problem_response("No object store on this deployment (S3_ENDPOINT_URL)"),
                        "503": _problem_response("The object store did not answer; see Retry-After"),
                    },
                }
            },
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "OK"}}}},
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model: its description and input schema",
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "name, description, input_schema"},
                        "401": _problem_response("Missing or wrong API key"),
                        "404": _problem_response("Unknown model"),
                    },
                }
            },
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
