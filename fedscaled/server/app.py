"""The device-facing HTTP application (protocol v1, see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from fedscaled import __version__, faults
from fedscaled.core import codec
from fedscaled.core.rounds import TEST, TRAIN, DeviceStatus
from fedscaled.errors import (
    BadRequest,
    FedError,
    InvalidTensor,
    NoArtifact,
    PayloadTooLarge,
    UnknownModelVersion,
)
from fedscaled.http_errors import Handler, error_middleware, json_object
from fedscaled.jobs.engine import Engine
from fedscaled.server.body_pool import BodyPool, Raw
from fedscaled.server.deadlines import BodyTimeouts, body_deadline
from fedscaled.server.openapi import openapi_document

ENGINE_KEY = web.AppKey("engine", Engine)
BODY_POOL_KEY = web.AppKey("body_pool", BodyPool)
BODY_TIMEOUTS_KEY = web.AppKey("body_timeouts", BodyTimeouts)
MAX_JSON_BODY = 64 * 1024
VERSION_RE = re.compile(r"[0-9]{1,40}")  # ASCII digits only (str.isdigit() also takes '²' and '٣')
MAX_VERSION = 2**63 - 1


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE_KEY]


async def _json(request: web.Request) -> dict[str, Any]:
    if request.content.is_eof():
        # The whole body arrived with the headers (a check-in's usually does): reading it cannot stall, so no
        # timer is armed (measured: the timer was a tenth of a check-in's CPU).
        return await json_object(request, MAX_JSON_BODY)
    size = min(request.content_length or MAX_JSON_BODY, MAX_JSON_BODY)
    async with body_deadline(request.app[BODY_TIMEOUTS_KEY], size, BadRequest, lambda: request.content.total_bytes):
        return await json_object(request, MAX_JSON_BODY)


def _job_label(request: web.Request) -> str:
    """The job name as a metrics label, only for jobs that exist: made-up names add no series."""
    job = request.match_info["job"]
    return job if _engine(request).job_exists(job) else "unknown"


def _device(request: web.Request) -> tuple[str, str]:
    job = request.match_info["job"]
    return job, _engine(request).authenticate(job, request.headers.get("Authorization"))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the daemon answers; 503 ``degraded`` while its disk is full (writes refused)."""
    store = _engine(request).store
    if store.full:
        return web.json_response({"status": "degraded", "reason": "storage_full", "version": __version__,
                                  "store_free_bytes": store.free_bytes()}, status=503)
    return web.json_response({"status": "ok", "version": __version__})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition."""
    engine = _engine(request)
    engine.metrics.store_free.set(engine.store.free_bytes())
    engine.metrics.store_full.set(1 if engine.store.full else 0)
    engine.metrics.body_pool_free.set(request.app[BODY_POOL_KEY].free_bytes)
    return web.Response(body=engine.metrics.render(), content_type="text/plain",
                        headers={"Cache-Control": "no-store"})


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 document of protocol v1."""
    return web.json_response(openapi_document())


async def enroll(request: web.Request) -> web.Response:
    """Register a device with the job's enrollment token."""
    body = await _json(request)
    answer = await _engine(request).enroll(request.match_info["job"], body.get("enrollment_token"),
                                           body.get("device_info"), address=request.remote or "")
    return web.json_response(answer, status=201)


# The check-in fields in the order they are checked: (name, type, lowest, highest); None: unbounded.
STATUS_FIELDS: tuple[tuple[str, type, int | None, int | None], ...] = (
    ("battery", int, 0, 100), ("charging", bool, None, None), ("idle", bool, None, None),
    ("unmetered", bool, None, None), ("free_storage_mb", int, 0, None), ("num_samples", int, 0, None))


def parse_status(body: dict[str, Any]) -> DeviceStatus:
    """Validate a check-in body into a DeviceStatus (BadRequest names the field)."""
    backends = body.get("backends")
    if not isinstance(backends, list) or not all(isinstance(b, str) and len(b) < 32 for b in backends) \
            or len(backends) > 16:
        raise BadRequest(f"check-in field 'backends' must be a list of names, got {backends!r}", field="backends")
    # One plain loop, no helper closure: this runs on every check-in (it was ~3 % of one's CPU).
    for name, kind, low, high in STATUS_FIELDS:
        value: Any = body.get(name)
        if type(value) is not kind:  # exact: a bool is not an integer here, nor an integer a bool
            what = "an integer" if kind is int else "true or false"
            raise BadRequest(f"check-in field {name!r} must be {what}, got {value!r}", field=name)
        number: Any = value  # (the exact-type test above narrows value to object for mypy)
        if (low is not None and number < low) or (high is not None and number > high):
            raise BadRequest(f"check-in field {name!r} must be in [{low}, {high}], got {value!r}", field=name)
    return DeviceStatus(battery=body["battery"], charging=body["charging"], idle=body["idle"],
                        unmetered=body["unmetered"], free_storage_mb=body["free_storage_mb"],
                        num_samples=body["num_samples"], backends=tuple(backends))


async def checkin(request: web.Request) -> web.Response:
    """Report device state; get a task, a retry window, or 'job over'."""
    job, device_id = _device(request)
    status = parse_status(await _json(request))
    return web.json_response(await _engine(request).checkin(job, device_id, status))


async def model_info(request: web.Request) -> web.Response:
    """The job's model layout and latest version."""
    job, _ = _device(request)
    return web.json_response(_engine(request).model_info(job))


async def model_weights(request: web.Request) -> web.Response:
    """Weights of one model version as safetensors (ETag; 304 on If-None-Match)."""
    job, _ = _device(request)
    raw = request.match_info["version"]
    if not VERSION_RE.fullmatch(raw):
        raise BadRequest(f"model version must be a non-negative integer, got {raw[:40]!r}")
    version = int(raw)
    if version > MAX_VERSION:
        raise UnknownModelVersion(f"job {job} has no model version {raw}", version=raw)
    etag = f'"{job}-{version}"'
    data = _engine(request).model_bytes(job, version)
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type="application/octet-stream", headers=headers)


IMMUTABLE = "private, max-age=31536000, immutable"
BACKEND_RE = re.compile(r"[a-z0-9_]{1,32}")


def _cached(request: web.Request, data: bytes, sha256: str, content_type: str, *, immutable: bool) -> web.Response:
    """``data`` with its SHA-256 as ETag; 304 when the device already holds it."""
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE if immutable else "private, no-cache"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type=content_type, headers=headers)


def _backend(request: web.Request) -> str:
    backend = request.match_info["backend"]
    if not BACKEND_RE.fullmatch(backend):
        raise BadRequest(f"backend must be a short lower-case name, got {backend[:40]!r}", field="backend")
    return backend


async def artifact_manifest(request: web.Request) -> web.Response:
    """The manifest of the job's artifact for a backend (JSON; ETag is its SHA-256)."""
    job, _ = _device(request)
    artifact = _engine(request).artifact(job, _backend(request))
    # Revalidated (no-cache): the same URL may name a rebuilt artifact after the job is replaced.
    return _cached(request, artifact.manifest, artifact.sha256, "application/json", immutable=False)


async def artifact_file(request: web.Request) -> web.Response:
    """One file of the job's artifact for a backend (ETag is its SHA-256, as in the manifest)."""
    job, _ = _device(request)
    artifact = _engine(request).artifact(job, _backend(request))
    name = request.match_info["file"]
    data = artifact.files.get(name)
    if data is None:
        raise NoArtifact(f"the {artifact.backend} artifact of job {job} has no file {name[:64]!r}",
                         backend=artifact.backend)
    return _cached(request, data, artifact.file_sha256[name], "application/octet-stream", immutable=True)


async def frozen_weights(request: web.Request) -> web.Response:
    """The job's frozen tensors (safetensors), for models that train only a head."""
    job, _ = _device(request)
    engine = _engine(request)
    data = engine.frozen_bytes(job)
    reference = engine.frozen_ref(job) or {}
    return _cached(request, data, str(reference.get("sha256", "")), "application/octet-stream", immutable=False)


async def read_body(request: web.Request, limit: int, pool: BodyPool, held: list[Raw],
                    timeouts: BodyTimeouts | None = None) -> memoryview:
    """Stream the request body into one buffer from ``pool`` (no chunk list, no join).

    The raw buffer is appended to ``held``; the caller releases it when the body is no longer used.
    A body that stalls or trickles is refused (``InvalidTensor``) within the bounds of ``timeouts``.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes exceeds this job's limit of {limit}", limit=limit)
    async with body_deadline(timeouts or BodyTimeouts(), limit if length is None else length, InvalidTensor,
                             lambda: request.content.total_bytes) as progress:
        if length is None:
            return await _read_chunked(request, limit, progress)
        return await _read_sized(request, length, pool, held, progress)


async def _read_sized(request: web.Request, length: int, pool: BodyPool, held: list[Raw],
                      progress: Callable[[], None]) -> memoryview:
    # Read the 8-byte header length first, then place the body so that its data section starts 64-byte
    # aligned: the codec can then use the tensors where they lie instead of copying them.
    try:
        head = await request.content.readexactly(min(8, length))
    except asyncio.IncompleteReadError as exc:
        raise InvalidTensor(f"truncated body: {len(exc.partial)} of {length} bytes") from None
    except (ConnectionResetError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
        raise InvalidTensor(f"truncated body: the connection broke mid-upload ({exc.__class__.__name__})") from None
    data_start = codec.data_offset(head)
    raw, buffer = pool.acquire(length, data_start if data_start is not None and data_start <= length else 0)
    held.append(raw)
    view = buffer.data
    view[: len(head)] = head
    position = len(head)
    while True:
        chunk = await _next_chunk(request)
        if not chunk:
            break
        progress()
        end = position + len(chunk)
        if end > length:
            raise BadRequest("body is longer than its Content-Length")
        view[position:end] = chunk
        position = end
    if position != length:
        raise InvalidTensor(f"truncated body: {position} of {length} bytes")
    return view


async def _read_chunked(request: web.Request, limit: int, progress: Callable[[], None]) -> memoryview:
    """A body of unknown length (chunked transfer): grow a buffer, refusing past ``limit``."""
    buffer = bytearray()
    while True:
        chunk = await _next_chunk(request)
        if not chunk:
            return memoryview(buffer)
        progress()
        if len(buffer) + len(chunk) > limit:
            raise PayloadTooLarge(f"body exceeds this job's limit of {limit} bytes", limit=limit)
        buffer += chunk


async def _next_chunk(request: web.Request) -> bytes:
    try:
        return await request.content.readany()
    except (ConnectionResetError, aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
        raise InvalidTensor(f"truncated body: the connection broke mid-upload ({exc.__class__.__name__})") from None


def _counting_refusals(counter: str, handler: Handler) -> Handler:
    """Wrap a result route so that every refusal is counted in metric ``counter`` by its error code."""
    async def counted(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except FedError as exc:
            getattr(_engine(request).metrics, counter).labels(_job_label(request), exc.code).inc()
            raise

    counted.__doc__ = handler.__doc__
    return counted


async def _upload(request: web.Request) -> web.Response:
    """Trained weights for a task (safetensors with metadata); durable before the answer."""
    job, device_id = _device(request)
    engine = _engine(request)
    limit = engine.max_upload_bytes(job)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds this job's limit of {limit}",
                              limit=limit)
    task_id = request.match_info["task_id"]
    async with engine.result_slot(job, device_id, task_id, TRAIN) as slot:
        if slot.duplicate is not None:
            engine.metrics.uploads.labels(job, "duplicate").inc()
            return web.json_response(slot.duplicate)
        began = time.perf_counter()
        held: list[Raw] = []
        try:
            body = await read_body(request, limit, request.app[BODY_POOL_KEY], held, request.app[BODY_TIMEOUTS_KEY])
            answer = await slot.accept_update(body)  # not counted if the device was revoked meanwhile
            faults.kill_if("kill_after_upload_commit")  # tests only: a crash between the commit and the answer
        except asyncio.CancelledError:
            held.clear()  # a queued fold may still read this body: never hand it to another upload
            raise
        finally:
            # The update is committed (or refused) and folded: its body buffer can take the next upload.
            for raw in held:
                request.app[BODY_POOL_KEY].release(raw)
        engine.metrics.ingest_seconds.observe(time.perf_counter() - began)
    engine.metrics.uploads.labels(job, "accepted").inc()
    return web.json_response(answer)


async def _result(request: web.Request) -> web.Response:
    """Test results (counts and sums) for a test task."""
    job, device_id = _device(request)
    engine = _engine(request)
    body = await _json(request)
    task_id = request.match_info["task_id"]
    async with engine.result_slot(job, device_id, task_id, TEST) as slot:
        if slot.duplicate is not None:
            engine.metrics.results.labels(job, "duplicate").inc()
            return web.json_response(slot.duplicate)
        answer = await slot.accept_result(body)
    engine.metrics.results.labels(job, "accepted").inc()
    return web.json_response(answer)


async def abandon(request: web.Request) -> web.Response:
    """The device gives its task up: the round stops waiting for it (no body)."""
    job, device_id = _device(request)
    return web.json_response(await _engine(request).abandon(job, device_id, request.match_info["task_id"]))


async def _close_body_pool(app: web.Application) -> None:
    app[BODY_POOL_KEY].close()


def build_device_app(engine: Engine, body_timeouts: BodyTimeouts | None = None) -> web.Application:
    """The aiohttp application for devices; ``body_timeouts`` bound how long a request body may take."""
    # Uploads are streamed by read_body with a per-job limit; client_max_size bounds everything else.
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JSON_BODY)
    app[ENGINE_KEY] = engine
    app[BODY_POOL_KEY] = BodyPool()
    app.on_cleanup.append(_close_body_pool)
    app[BODY_TIMEOUTS_KEY] = body_timeouts or BodyTimeouts()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_post("/v1/jobs/{job}/enroll", enroll)
    app.router.add_post("/v1/jobs/{job}/checkin", checkin)
    app.router.add_get("/v1/jobs/{job}/model", model_info)
    app.router.add_get("/v1/jobs/{job}/models/{version}", model_weights)
    app.router.add_get("/v1/jobs/{job}/artifacts/{backend}", artifact_manifest)
    app.router.add_get("/v1/jobs/{job}/artifacts/{backend}/{file}", artifact_file)
    app.router.add_get("/v1/jobs/{job}/frozen", frozen_weights)
    app.router.add_put("/v1/jobs/{job}/tasks/{task_id}/update", _counting_refusals("uploads", _upload))
    app.router.add_post("/v1/jobs/{job}/tasks/{task_id}/result", _counting_refusals("results", _result))
    app.router.add_post("/v1/jobs/{job}/tasks/{task_id}/abandon", abandon)
    return app
