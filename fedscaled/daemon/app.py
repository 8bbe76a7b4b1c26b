"""The daemon's lifecycle, uvicorn-style: one config, startup, serve, ordered graceful shutdown.

Startup: lock the data dir, open the store, resume active jobs, serve the device API on TCP and the
control API on the Unix socket, write ``run.json``, log one ready line, tell systemd.
Shutdown (SIGTERM/SIGINT set an event): stop accepting, let in-flight requests finish (uploads are
durable before their answer), stop the round engines, close the store, remove the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import time
from typing import IO

from aiohttp import web

from fedscaled import __version__
from fedscaled.artifacts import PREBUILT_DIR
from fedscaled.ctl import unix_socket
from fedscaled.ctl.api import build_control_app
from fedscaled.daemon import systemd
from fedscaled.daemon.config import DaemonConfig
from fedscaled.errors import FedError
from fedscaled.jobs.artifacts import ArtifactCatalog
from fedscaled.jobs.engine import Engine
from fedscaled.jobs.joblog import JobLog
from fedscaled.jobs.registry import JobRegistry
from fedscaled.server.app import build_device_app
from fedscaled.server.connections import (
    ACCEPT_ERRORS,
    FD_RESERVE,
    DeviceSite,
    default_max_connections,
    open_file_limit,
    tls_context,
)
from fedscaled.server.deadlines import BodyTimeouts
from fedscaled.server.quiet_log import PROTOCOL_LOG
from fedscaled.store.lmdb_store import Store, open_store

log = logging.getLogger("fedscaled")


class DataDirLocked(FedError):
    code = "data_dir_locked"
    status = 409
    description = "Another daemon already uses this data directory."


class ListenFailed(FedError):
    code = "listen_failed"
    status = 500
    description = "The daemon could not bind its device address (in use, or not allowed)."


LINGERING_TIME = 10.0  # aiohttp's default


class Daemon:
    """One running daemon. Build with a config, then ``await run()``."""

    def __init__(self, config: DaemonConfig, launched_at: float | None = None) -> None:
        self.config = config
        # When the command started (time.monotonic), so that the ready line counts imports too.
        self.launched_at = launched_at
        self.stop_requested = asyncio.Event()
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.device_port: int | None = None
        self._lock_file: IO[str] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._device_runner: web.AppRunner | None = None
        self._control_runner: web.AppRunner | None = None
        self._control_sock: socket.socket | None = None

    def request_stop(self) -> None:
        """Ask the daemon to shut down (signal handlers call this)."""
        self.stop_requested.set()

    async def run(self) -> None:
        """Start, serve until a stop is requested, shut down."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
            await self.stop_requested.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def startup(self) -> None:
        """Open everything and begin serving."""
        started = self.launched_at if self.launched_at is not None else time.monotonic()
        config = self.config
        # Checked first: a bad certificate or key stops the start (exit 2) before any state is touched.
        tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_data_dir()
        self.store = open_store(config.data_dir)
        registry = JobRegistry(self.store, JobLog(self.store))
        artifacts = ArtifactCatalog([config.artifact_path, PREBUILT_DIR])
        self.engine = Engine(registry, max_pending_checkins=config.max_pending_checkins, artifacts=artifacts,
                             max_model_params=config.max_model_params)
        await self.engine.start()

        self._control_sock = unix_socket.bind(config.socket_path, config.socket_group)
        self._control_runner = web.AppRunner(build_control_app(registry, self.engine), handle_signals=False,
                                             shutdown_timeout=config.shutdown_timeout, access_log=None)
        await self._control_runner.setup()
        await web.SockSite(self._control_runner, self._control_sock).start()

        self._device_runner = web.AppRunner(
            build_device_app(self.engine, BodyTimeouts(config.body_timeout, config.min_body_rate)),
            handle_signals=False, shutdown_timeout=config.shutdown_timeout, access_log=None,
            keepalive_timeout=config.keepalive_timeout, logger=PROTOCOL_LOG,
            # After an answer given before the body was read (401, 413, a body that timed out), aiohttp reads
            # and drops the rest for up to this long so that the client sees the answer, then closes.
            lingering_time=min(LINGERING_TIME, config.body_timeout))
        await self._device_runner.setup()
        site = DeviceSite(self._device_runner, config.listen_host, config.listen_port,
                          max_connections=self._max_connections(), header_timeout=config.header_timeout,
                          ssl_context=tls)
        logging.getLogger("asyncio").addFilter(ACCEPT_ERRORS)
        try:
            await site.start()
        except OSError as exc:
            raise ListenFailed(f"cannot listen on {config.listen}: {exc.strerror}") from None
        self.device_port = site.port
        self._write_run_info()
        log.info("fedscaled %s ready in %.2fs: devices on %s://%s:%d, control socket %s, data dir %s",
                 __version__, time.monotonic() - started, "https" if tls else "http", config.listen_host,
                 self.device_port, config.socket_path, config.data_dir)
        systemd.notify("READY=1\nSTATUS=serving")
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.get_running_loop().create_task(systemd.watchdog(interval), name="watchdog")

    def _max_connections(self) -> int:
        """The device site's connection cap (configured, or derived from the open-file limit)."""
        config = self.config
        if config.max_connections is None:
            return default_max_connections(config.max_pending_checkins)
        room = open_file_limit() - FD_RESERVE
        if config.max_connections > room:
            log.warning("max_connections %d is above the open-file limit %d less %d: the daemon may run out of "
                        "file descriptors (raise LimitNOFILE / ulimit -n)", config.max_connections,
                        open_file_limit(), FD_RESERVE)
        return config.max_connections

    def _lock_data_dir(self) -> None:
        path = self.config.data_dir / "daemon.lock"
        handle = open(path, "a+")  # noqa: SIM115 (held for the daemon's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DataDirLocked(f"another fedscaled daemon uses the data dir {self.config.data_dir}") from None
        self._lock_file = handle

    def _write_run_info(self) -> None:
        info = {"pid": os.getpid(), "host": self.config.listen_host, "port": self.device_port,
                "scheme": "https" if self.config.tls_cert else "http",
                "socket": str(self.config.socket_path), "version": __version__}
        path = self.config.data_dir / "run.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)

    async def shutdown(self) -> None:
        """Ordered shutdown; safe to call after a failed startup."""
        systemd.notify("STOPPING=1")
        if self._watchdog is not None:
            self._watchdog.cancel()  # keeps pinging until here: a long drain is not a hang
        began = time.monotonic()
        if self.engine is not None:
            self.engine.begin_shutdown()  # wakes held check-ins with "come back later"
        for runner in (self._device_runner, self._control_runner):
            if runner is not None:
                await runner.cleanup()
        if self.engine is not None:
            await self.engine.stop()
        if self.store is not None:
            self.store.close()
        if self._control_sock is not None:
            unix_socket.remove(self.config.socket_path, self._control_sock)
        with contextlib.suppress(FileNotFoundError):
            (self.config.data_dir / "run.json").unlink()
        if self._lock_file is not None:
            self._lock_file.close()
        logging.getLogger("asyncio").removeFilter(ACCEPT_ERRORS)
        if self.store is not None:
            log.info("fedscaled stopped cleanly in %.2fs", time.monotonic() - began)


def pin_malloc_thresholds() -> bool:
    """Keep large buffers (upload bodies, decoded models) out of glibc's heap.

    glibc raises its mmap threshold to the size of each freed mmapped chunk, so after the first upload
    every later multi-megabyte body comes from the heap, where fragmentation keeps it resident after it
    is freed: RSS then grows with the number of uploads. A fixed threshold (setting it disables the
    dynamic one) returns every large buffer to the kernel when freed. No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    ok = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(libc.mallopt(m_trim_threshold,
                                                                                     TRIM_THRESHOLD))
    return ok


MMAP_THRESHOLD = 1 << 20  # buffers of 1 MiB and more get their own mapping
TRIM_THRESHOLD = 8 << 20  # give back heap tops above 8 MiB


def run_daemon(config: DaemonConfig, launched_at: float | None = None) -> None:
    """Run the daemon in this process until SIGTERM/SIGINT."""
    pin_malloc_thresholds()
    asyncio.run(Daemon(config, launched_at).run())
