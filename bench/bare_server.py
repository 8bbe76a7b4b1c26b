"""The baseline server: a bare aiohttp application with no auth, no validation and no storage.

``python -m bench.bare_server MODE PORT_FILE`` listens on a free loopback port and writes it to
PORT_FILE. Every route answers what the daemon would answer, doing the least aiohttp allows:

- ``PUT .../update`` streams the body and discards it (the fastest way aiohttp can read a body);
- ``POST .../checkin`` reads the body and returns the daemon's "not eligible" JSON;
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


async def healthz(request: web.Request) -> web.Response:
    """Liveness."""
    return web.json_response({"status": "ok", "version": "bare"})


def build_app() -> web.Application:
    """The baseline application."""
    app = web.Application(client_max_size=1 << 30)
    app.router.add_put("/v1/jobs/{job}/tasks/{task_id}/update", upload)
    app.router.add_post("/v1/jobs/{job}/checkin", checkin)
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
