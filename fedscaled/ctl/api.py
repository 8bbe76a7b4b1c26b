"""The control API inside the daemon, served over the Unix socket to ``fedscalectl``.

Routes (JSON unless noted):

- ``GET  /v1/version``                 → ``{"api_version", "version"}``
- ``GET  /v1/jobs``                    → ``{"jobs": [status, ...]}``
- ``POST /v1/jobs``                    ← ``{"text", "replace", "source"}`` → 201 status
- ``GET  /v1/jobs/{name}``             → status
- ``POST /v1/jobs/{name}/stop``        → status
- ``POST /v1/jobs/{name}/rotate-token`` → status (with the new ``enrollment_token``)
- ``GET  /v1/jobs/{name}/devices``     → ``{"job", "devices": [{device_id, enrolled_at, last_seen,
  tasks_done, state, revoked_at}, ...]}``
- ``POST /v1/jobs/{name}/devices/{device}/revoke`` → ``{"job", "device_id", "revoked", "already_revoked"}``
- ``GET  /v1/jobs/{name}/logs?since=N&follow=1`` → NDJSON, one event per line; with ``follow`` the
  stream stays open until the job has ended and every event was sent.

Every request is logged with the caller's uid and pid (the socket's peer credentials, ``SO_PEERCRED``):
actions at INFO, reads at DEBUG; actions that change a job also name the caller in the job's log.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from typing import Any

from aiohttp import web

from fedscaled import __version__
from fedscaled.ctl.protocol import API_VERSION
from fedscaled.errors import BadRequest
from fedscaled.http_errors import Handler, error_middleware, json_object
from fedscaled.jobs.engine import Engine
from fedscaled.jobs.registry import ACTIVE_STATES, JobRegistry, caller_text, status_view

log = logging.getLogger("fedscaled.control")

REGISTRY_KEY = web.AppKey("registry", JobRegistry)
ENGINE_KEY = web.AppKey("engine", Engine)
CALLER_KEY = web.RequestKey("caller", dict)
MAX_JOB_FILE = 1 << 20
FOLLOW_POLL_SECONDS = 5.0


def peer_credentials(request: web.Request) -> dict[str, int]:
    """``{"uid", "gid", "pid"}`` of the process at the other end of the Unix socket; ``{}`` where the
    platform or transport does not tell (SO_PEERCRED is Linux's)."""
    option = getattr(socket, "SO_PEERCRED", None)
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if option is None or sock is None:
        return {}
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except (OSError, struct.error):
        return {}
    return {"uid": uid, "gid": gid, "pid": pid}


def _caller(request: web.Request) -> dict[str, Any]:
    """Who asked, as fields of a job-log event (uid and pid)."""
    peer = request.get(CALLER_KEY) or {}
    return {k: peer[k] for k in ("uid", "pid") if k in peer}


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log every control request with the caller's uid and pid, and the answer's status."""
    peer = peer_credentials(request)
    request[CALLER_KEY] = peer
    response = await handler(request)  # errors are rendered by error_middleware, inside this one
    level = logging.DEBUG if request.method in ("GET", "HEAD") else logging.INFO
    log.log(level, "control: %s %s by %s: %d", request.method, request.path, caller_text(peer), response.status)
    return response


async def version(request: web.Request) -> web.Response:
    """The control API version (the CLI checks it first)."""
    return web.json_response({"api_version": API_VERSION, "version": __version__})


async def list_jobs(request: web.Request) -> web.Response:
    """All jobs."""
    registry = request.app[REGISTRY_KEY]
    return web.json_response({"jobs": [status_view(r) for r in registry.all()]})


async def submit(request: web.Request) -> web.Response:
    """Submit a job file's text."""
    body = await json_object(request)
    text = body.get("text")
    if not isinstance(text, str):
        raise BadRequest("field 'text' (the job file's content) must be a string")
    replace = bool(body.get("replace", False))
    source = str(body.get("source", ""))
    record = await request.app[REGISTRY_KEY].submit(text, replace=replace, source=source, caller=_caller(request))
    return web.json_response(status_view(record), status=201)


async def get_job(request: web.Request) -> web.Response:
    """One job's status, with the number of enrolled devices."""
    registry = request.app[REGISTRY_KEY]
    view = status_view(registry.get(request.match_info["name"]))
    view["enrolled_devices"] = registry.enrolled_devices(view["name"])
    view["live"] = request.app[ENGINE_KEY].live_view(view["name"])
    return web.json_response(view)


async def stop_job(request: web.Request) -> web.Response:
    """Stop a job."""
    record = await request.app[REGISTRY_KEY].stop(request.match_info["name"], caller=_caller(request))
    return web.json_response(status_view(record))


async def rotate_token(request: web.Request) -> web.Response:
    """Give a job a new enrollment token (the old one stops enrolling; enrolled devices are unaffected)."""
    record = await request.app[REGISTRY_KEY].rotate_token(request.match_info["name"], caller=_caller(request))
    return web.json_response(status_view(record))


async def revoke_device(request: web.Request) -> web.Response:
    """Revoke one device of a job: its token answers 403 ``device_revoked`` from now on."""
    answer = await request.app[ENGINE_KEY].revoke(request.match_info["name"], request.match_info["device"],
                                                  _caller(request))
    return web.json_response(answer)


async def list_devices(request: web.Request) -> web.Response:
    """The devices of a job."""
    name = request.match_info["name"]
    return web.json_response({"job": name, "devices": request.app[ENGINE_KEY].device_list(name)})


def _since(request: web.Request) -> int:
    raw = request.query.get("since", "0")
    try:
        since = int(raw) if len(raw) <= 20 else -1
    except ValueError:
        raise BadRequest(f"since must be a non-negative integer, got {raw[:40]!r}") from None
    # Event sequence numbers are u64 keys: anything larger could not be looked up (and once failed mid-stream).
    if not 0 <= since < 2**63:
        raise BadRequest(f"since must be an integer in [0, 2^63), got {raw[:40]!r}")
    return since


async def logs(request: web.Request) -> web.StreamResponse:
    """Stream a job's events as NDJSON; follow until the job ends when asked."""
    registry = request.app[REGISTRY_KEY]
    name = request.match_info["name"]
    since = _since(request)
    follow = request.query.get("follow", "0") in ("1", "true", "yes")
    registry.get(name)  # 404 before the stream starts
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    while True:
        events = registry.events(name, since)
        for event in events:
            await response.write(json.dumps(event).encode() + b"\n")
            since = event["seq"]
        if not follow:
            break
        if not events and registry.get(name)["state"] not in ACTIVE_STATES:
            break
        if not events:
            await registry.log.wait(name, FOLLOW_POLL_SECONDS)
    await response.write_eof()
    return response


async def export_model(request: web.Request) -> web.Response:
    """A model version of a job as safetensors (``?version=N``; the latest by default), for operators."""
    registry = request.app[REGISTRY_KEY]
    name = request.match_info["name"]
    record = registry.get(name)
    raw = request.query.get("version", "")
    if raw and (not raw.isascii() or not raw.isdigit() or len(raw) > 19):
        raise BadRequest(f"version must be a non-negative integer, got {raw[:40]!r}")
    version = int(raw) if raw else int(record["model_version"])
    data = request.app[ENGINE_KEY].model_bytes(name, version)
    return web.Response(body=data, content_type="application/octet-stream",
                        headers={"X-Model-Version": str(version)})


def build_control_app(registry: JobRegistry, engine: Engine) -> web.Application:
    """The aiohttp application behind the control socket."""
    app = web.Application(middlewares=[audit_middleware, error_middleware], client_max_size=MAX_JOB_FILE * 2)
    app[REGISTRY_KEY] = registry
    app[ENGINE_KEY] = engine
    app.router.add_get("/v1/version", version)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs/{name}", get_job)
    app.router.add_post("/v1/jobs/{name}/stop", stop_job)
    app.router.add_post("/v1/jobs/{name}/rotate-token", rotate_token)
    app.router.add_get("/v1/jobs/{name}/devices", list_devices)
    app.router.add_post("/v1/jobs/{name}/devices/{device}/revoke", revoke_device)
    app.router.add_get("/v1/jobs/{name}/logs", logs)
    app.router.add_get("/v1/jobs/{name}/model", export_model)
    return app
