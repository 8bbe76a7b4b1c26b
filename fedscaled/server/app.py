"""The device-facing HTTP application."""

from __future__ import annotations

from aiohttp import web

from fedscaled import __version__
from fedscaled.http_errors import error_middleware
from fedscaled.jobs.engine import Engine

ENGINE_KEY = web.AppKey("engine", Engine)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the daemon answers."""
    return web.json_response({"status": "ok", "version": __version__})


def build_device_app(engine: Engine) -> web.Application:
    """The aiohttp application for devices."""
    app = web.Application(middlewares=[error_middleware])
    app[ENGINE_KEY] = engine
    app.router.add_get("/healthz", healthz)
    return app
