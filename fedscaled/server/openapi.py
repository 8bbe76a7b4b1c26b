"""The OpenAPI 3 document of device protocol v1 (served at ``GET /v1/openapi.json``).

Kept beside the routes so that a test can check that every route is described and every error code
in a response is in the catalog.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fedscaled import __version__
from fedscaled.errors import catalog

_ERROR = {"$ref": "#/components/schemas/Error"}
_RETRY = {"type": "object", "required": ["min", "max"],
          "properties": {"min": {"type": "number"}, "max": {"type": "number"}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    described = {
        400: "bad_request: malformed JSON or a missing or mistyped field",
        401: "unauthorized: missing or wrong token",
        403: "device_revoked: the operator revoked this device; stop using its token",
        404: "job_not_found, unknown_task, unknown_model_version or no_artifact",
        409: "job_not_active, wrong_round, stale_update (asynchronous jobs), wrong_task_kind or (enroll) job_full",
        410: "task_expired: the task's deadline passed",
        413: "payload_too_large: body above the job's limit",
        422: "invalid_tensor or invalid_metadata",
        429: "rate_limited: too many enrollments (per job token or per address); retry after Retry-After",
        503: "overloaded: retry after the Retry-After header",
        507: "storage_full: the daemon's disk is full; nothing was stored, retry after the Retry-After header",
    }
    return {str(code): _json(_ERROR, described[code]) for code in codes}


_PATH_JOB = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH_TASK = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

_ARTIFACT_REF = {
    "type": "object", "required": ["backend"],
    "description": "The engine to run the task with: jax (the reference runtime, no download), or an artifact "
                   "to fetch from `manifest` (its SHA-256 is `sha256`; cache by it)",
    "properties": {"backend": {"type": "string"}, "manifest": {"type": "string"}, "sha256": {"type": "string"}},
}
_FROZEN_REF = {
    "type": "object", "required": ["url", "sha256"],
    "description": "The model's frozen tensors (safetensors), for models that train only a head",
    "properties": {"url": {"type": "string"}, "sha256": {"type": "string"}},
}
_TENSORS = {"type": "array", "items": {"type": "object", "required": ["name", "shape", "dtype"], "properties": {
    "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
    "dtype": {"type": "string", "enum": ["F32"]}}}}
_MODEL_INFO = {
    "type": "object",
    "required": ["job", "model", "input_shape", "num_classes", "width_multiplier", "checkin_wait", "latest_version",
                 "num_params",
                 "state", "tensors", "frozen_tensors", "backends"],
    "properties": {
        "job": {"type": "string"}, "model": {"type": "string"},
        "input_shape": {"type": "array", "items": {"type": "integer"}}, "num_classes": {"type": "integer"},
        "width_multiplier": {"type": "number"}, "latest_version": {"type": "integer"},
        "checkin_wait": {"type": "number", "description": "longest a check-in is held (s): the client's "
                         "read timeout must exceed it"},
        "num_params": {"type": "integer"}, "state": {"type": "string"},
        "tensors": _TENSORS, "frozen_tensors": _TENSORS,
        "backends": {"type": "object", "additionalProperties": _ARTIFACT_REF,
                     "description": "every backend the job serves, by name"},
        "frozen": _FROZEN_REF,
    },
}
_BINARY = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
_PATH_BACKEND = {"name": "backend", "in": "path", "required": True, "schema": {"type": "string"}}
_IF_NONE_MATCH = {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}

_TASK = {
    "type": "object",
    "required": ["task_id", "kind", "round", "model_version", "deadline", "deadline_in", "config"],
    "properties": {
        "task_id": {"type": "string"}, "kind": {"type": "string", "enum": ["train", "test"]},
        "round": {"type": "integer"}, "model_version": {"type": "integer"},
        "deadline": {"type": "number", "description": "unix seconds"},
        "deadline_in": {"type": "number", "description": "seconds from now"},
        "config": {"type": "object", "description": "train: learning_rate, local_steps, epochs, batch_size, "
                   "weight_decay; test: test_bsz"},
        "artifact": _ARTIFACT_REF,
        "frozen": _FROZEN_REF,
    },
}

_CHECKIN_ANSWER = {
    "type": "object", "required": ["action"],
    "properties": {
        "action": {"type": "string", "enum": ["train", "test", "wait", "done"]},
        "task": _TASK,
        "reason": {"type": "string", "enum": ["not_eligible", "not_selected", "round_in_progress", "no_round",
                                              "superseded", "shutting_down", "unsupported_backend"]},
        "retry_after": _RETRY,
        "state": {"type": "string", "enum": ["pending", "running", "finished", "stopped", "failed"]},
        "backends": {"type": "array", "items": {"type": "string"},
                     "description": "with reason unsupported_backend: the backends the job serves"},
    },
}

_DEVICE_STATE = {
    "type": "object",
    "required": ["battery", "charging", "idle", "unmetered", "free_storage_mb", "num_samples", "backends"],
    "properties": {
        "battery": {"type": "integer", "minimum": 0, "maximum": 100},
        "charging": {"type": "boolean"}, "idle": {"type": "boolean"}, "unmetered": {"type": "boolean"},
        "free_storage_mb": {"type": "integer", "minimum": 0},
        "num_samples": {"type": "integer", "minimum": 0},
        "backends": {"type": "array", "items": {"type": "string"}, "maxItems": 16},
    },
}

_ACCEPTED = {"type": "object", "required": ["accepted", "task_id", "round", "duplicate"],
             "properties": {"accepted": {"type": "boolean"}, "task_id": {"type": "string"},
                            "round": {"type": "integer"}, "duplicate": {"type": "boolean"}}}


@cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document (built once)."""
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "ok")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format"}}}},
        "/v1/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        "/v1/jobs/{job}/enroll": {"post": {
            "summary": "Enroll a device with the job's enrollment token", "parameters": [_PATH_JOB],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["enrollment_token"],
                "properties": {"enrollment_token": {"type": "string"}, "device_info": {"type": "object"}}}}}},
            "responses": {"201": _json({"type": "object", "required": ["device_id", "token", "job"],
                                        "properties": {"device_id": {"type": "string"}, "token": {"type": "string"},
                                                       "job": {"type": "string"}}}, "enrolled"),
                          **_errors(400, 401, 404, 409, 413, 429, 503, 507)}}},
        "/v1/jobs/{job}/checkin": {"post": {
            "summary": "Report device state; get a task, a retry window or 'job over' (may wait up to "
                       "the job's checkin_wait seconds)", "parameters": [_PATH_JOB], "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _DEVICE_STATE}}},
            "responses": {"200": _json(_CHECKIN_ANSWER, "the answer"), **_errors(400, 401, 404, 413, 503)}}},
        "/v1/jobs/{job}/model": {"get": {
            "summary": "The job's model layout and latest version", "parameters": [_PATH_JOB],
            "security": _BEARER, "responses": {"200": _json(_MODEL_INFO, "model description"),
                                               **_errors(401, 404)}}},
        "/v1/jobs/{job}/artifacts/{backend}": {"get": {
            "summary": "The manifest of the job's artifact for a backend (docs/mobile.md); ETag is its SHA-256",
            "parameters": [_PATH_JOB, _PATH_BACKEND, _IF_NONE_MATCH], "security": _BEARER,
            "responses": {"200": _json({"type": "object"}, "the manifest"), "304": {"description": "not modified"},
                          **_errors(400, 401, 404)}}},
        "/v1/jobs/{job}/artifacts/{backend}/{file}": {"get": {
            "summary": "One file of the artifact (.tflite, .mnn); ETag is its SHA-256 as in the manifest",
            "parameters": [_PATH_JOB, _PATH_BACKEND, _IF_NONE_MATCH,
                           {"name": "file", "in": "path", "required": True, "schema": {"type": "string"}}],
            "security": _BEARER,
            "responses": {"200": {"description": "the file", **_BINARY}, "304": {"description": "not modified"},
                          **_errors(400, 401, 404)}}},
        "/v1/jobs/{job}/frozen": {"get": {
            "summary": "The frozen tensors of a model that trains only its head (safetensors); ETag is the SHA-256",
            "parameters": [_PATH_JOB, _IF_NONE_MATCH], "security": _BEARER,
            "responses": {"200": {"description": "safetensors file", **_BINARY}, "304": {"description": "not modified"},
                          **_errors(401, 404)}}},
        "/v1/jobs/{job}/models/{version}": {"get": {
            "summary": "Weights of a model version (safetensors, F32)", "security": _BEARER,
            "parameters": [_PATH_JOB, {"name": "version", "in": "path", "required": True,
                                       "schema": {"type": "integer", "minimum": 0}},
                           {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "safetensors file",
                                  "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                          "304": {"description": "not modified"}, **_errors(400, 401, 404)}}},
        "/v1/jobs/{job}/tasks/{task_id}/update": {"put": {
            "summary": "Upload the trained weights of a training task (idempotent by task id)",
            "parameters": [_PATH_JOB, _PATH_TASK], "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary",
                           "description": "safetensors with every model tensor; __metadata__: samples, loss, "
                                          "utility?, duration?"}}}},
            "responses": {"200": _json(_ACCEPTED, "durable on disk"),
                          **_errors(400, 401, 404, 409, 410, 413, 422, 503, 507)}}},
        "/v1/jobs/{job}/tasks/{task_id}/result": {"post": {
            "summary": "Test results of a test task (idempotent by task id)",
            "parameters": [_PATH_JOB, _PATH_TASK], "security": _BEARER,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["samples", "correct_top1", "correct_top5", "loss_sum"],
                "properties": {"samples": {"type": "integer", "minimum": 1},
                               "correct_top1": {"type": "integer", "minimum": 0},
                               "correct_top5": {"type": "integer", "minimum": 0},
                               "loss_sum": {"type": "number", "minimum": 0},
                               "duration": {"type": "number", "minimum": 0}}}}}},
            "responses": {"200": _json(_ACCEPTED, "recorded"),
                          **_errors(400, 401, 404, 409, 410, 413, 422, 503, 507)}}},
        "/v1/jobs/{job}/tasks/{task_id}/abandon": {"post": {
            "summary": "Give a task up (the device cannot finish it): the round no longer waits for it; idempotent",
            "parameters": [_PATH_JOB, _PATH_TASK], "security": _BEARER,
            "responses": {"200": _json({"type": "object", "required": ["task_id", "abandoned"],
                                        "properties": {"task_id": {"type": "string"},
                                                       "abandoned": {"type": "boolean"},
                                                       "duplicate": {"type": "boolean"},
                                                       "reason": {"type": "string", "enum": ["result_delivered"]}}},
                                       "given up (abandoned false: its result was already delivered)"),
                          **_errors(401, 404, 409, 503, 507)}}},
    }
    for operations in paths.values():
        for operation in operations.values():
            if operation.get("security"):  # a device's token may be revoked on every route that takes one
                operation["responses"].update(_errors(403))
    return {
        "openapi": "3.0.3",
        "info": {"title": "fedscaled device protocol", "version": f"v1 (daemon {__version__})"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string", "enum": sorted({c.code for c in catalog()})},
                               "message": {"type": "string"}, "details": {"type": "object"}}}}}},
        },
    }
