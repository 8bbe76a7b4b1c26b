"""The control API inside the daemon, served over the Unix socket to ``fedscalectl``.

Routes (JSON unless noted):

- ``GET  /v1/version``                 → ``{"api_version", "version"}``
- ``GET  /v1/jobs``                    → ``{"jobs": [status, ...]}``
- ``POST /v1/jobs``                    ← ``{"text", "replace", "source"}`` → 201 status
- ``GET  /v1/jobs/{name}``             → status
- ``POST /v1/jobs/{name}/stop``        → status
- ``GET  /v1/jobs/{name}/logs?since=N&follow=1`` → NDJSON, one event per line; with ``follow`` the
  stream stays open until the job has ended and every event was sent.
"""

from __future__ import annotations

import json

from aiohttp import web

from fedscaled import __version__
from fedscaled.ctl.protocol import API_VERSION
from fedscaled.errors import BadRequest
from fedscaled.http_errors import error_middleware, json_object
from fedscaled.jobs.registry import ACTIVE_STATES, JobRegistry, status_view

REGISTRY_KEY = web.AppKey("registry", JobRegistry)
MAX_JOB_FILE = 1 << 20
FOLLOW_POLL_SECONDS = 5.0


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
    record = await request.app[REGISTRY_KEY].submit(text, replace=replace, source=source)
    return web.json_response(status_view(record), status=201)


async def get_job(request: web.Request) -> web.Response:
    """One job's status, with the number of enrolled devices."""
    registry = request.app[REGISTRY_KEY]
    view = status_view(registry.get(request.match_info["name"]))
    view["enrolled_devices"] = registry.enrolled_devices(view["name"])
    return web.json_response(view)


async def stop_job(request: web.Request) -> web.Response:
    """Stop a job."""
    record = await request.app[REGISTRY_KEY].stop(request.match_info["name"])
    return web.json_response(status_view(record))


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


def build_control_app(registry: JobRegistry) -> web.Application:
    """The aiohttp application behind the control socket."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_JOB_FILE * 2)
    app[REGISTRY_KEY] = registry
    app.router.add_get("/v1/version", version)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs/{name}", get_job)
    app.router.add_post("/v1/jobs/{name}/stop", stop_job)
    app.router.add_get("/v1/jobs/{name}/logs", logs)
    return app
