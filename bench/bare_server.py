"""The baseline server: a bare aiohttp application with no auth, no validation and no storage.

``python -m bench.bare_server MODE PORT_FILE`` listens on a free loopback port and writes it to
PORT_FILE. Every route answers what the daemon would answer, doing the least aiohttp allows:

- ``PUT .../update`` streams the body and discards it (the fastest way aiohttp can read a body);
- ``POST .../checkin`` reads the body and returns the daemon's "not eligible" JSON;
- ``POST .../held-checkin`` reads the body and holds the request (as the daemon holds an eligible device's
  check-in until the next selection) until ``POST /release``; ``GET /held`` says how many are held;
- ``GET /healthz`` answers like the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from aiohttp import web

WAIT_ANSWER = {"action": "wait", "reason": "not_eligible", "retry_after": {"min": 1.0, "max": 2.0}}


async def upload(request: web.Request) -> web.Response:
    """Read the body chunk by chunk and drop it."""
    total = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        total += len(chunk)
    task_id = request.match_info["task_id"]
    return web.json_response({"accepted": True, "task_id": task_id, "round": 1, "duplicate": False,
                              "bytes": total})


async def checkin(request: web.Request) -> web.Response:
    """Read the body and answer 'not eligible'."""
    await request.read()
    return web.json_response(WAIT_ANSWER)


HELD_KEY = web.AppKey("held", dict)


async def held_checkin(request: web.Request) -> web.Response:
    """Read the body, then wait for ``/release`` (bounded: 600 s) and answer a training task."""
    await request.read()
    state = request.app[HELD_KEY]
    state["count"] += 1
    try:
        await asyncio.wait_for(state["release"].wait(), timeout=600)
    finally:
        state["count"] -= 1
    return web.json_response({"action": "train", "task": {"task_id": "t", "round": 1}})


async def held(request: web.Request) -> web.Response:
    """How many check-ins are held now."""
    return web.json_response({"held": request.app[HELD_KEY]["count"]})


async def release(request: web.Request) -> web.Response:
    """Answer every held check-in; later ones are held again."""
    state = request.app[HELD_KEY]
    state["release"].set()
    state["release"] = asyncio.Event()
    return web.json_response({"released": True})


async def healthz(request: web.Request) -> web.Response:
    """Liveness."""
    return web.json_response({"status": "ok", "version": "bare"})


def build_app() -> web.Application:
    """The baseline application."""
    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/v1/jobs/{job}/tasks/{task_id}/update", upload)
    app.router.add_post("/v1/jobs/{job}/checkin", checkin)
    app[HELD_KEY] = {"count": 0, "release": asyncio.Event()}
    app.router.add_post("/v1/jobs/{job}/held-checkin", held_checkin)
    app.router.add_get("/held", held)
    app.router.add_post("/release", release)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(port_file: Path) -> None:
    """Serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(build_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)  # the daemon's DeviceSite listens with 1024 too
    await site.start()
    port = int(runner.addresses[0][1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(port_file)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()


def main() -> None:
    """Entry point: MODE (informational) and PORT_FILE."""
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.bare_server MODE PORT_FILE")
    asyncio.run(serve(Path(sys.argv[2])))


if __name__ == "__main__":
    main()
