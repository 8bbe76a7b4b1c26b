"""The device API's listening socket: how many connections it keeps, and how long one may stay silent.

aiohttp's ``RequestHandler`` already closes a connection that has no complete request to work on
``keepalive_timeout`` seconds after it was opened or after its previous response (its keep-alive timer is
not extended by the bytes of an incomplete request, so it bounds slow headers too). What it lacks, and
:class:`DeviceSite` adds around it:

- a cap on open connections, set below the process's open-file limit: past it a new connection is
  answered ``503 overloaded`` with ``Retry-After`` and closed, before any request handler is made, so the
  daemon never runs out of file descriptors (which stops ``accept()`` for everyone and floods the log);
- a header timeout: a new connection must complete its first request's headers within ``header_timeout``
  seconds (a TLS handshake gets the same time before that);
- TLS, when given an ``ssl.SSLContext``.

Bodies are bounded per request by :mod:`fedscaled.server.deadlines`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from fedscaled.errors import InvalidConfig, Overloaded
from fedscaled.server.quiet_log import RateLimitFilter, once_per

log = logging.getLogger("fedscaled.http")

RETRY_AFTER = 5  # seconds, in the 503 answered past the connection cap
REFUSAL_LINGER = 1.0  # seconds a refused connection stays open for its request to be read (no RST)
FD_RESERVE = 128  # file descriptors kept for the store, the log, the control socket and artifacts


def default_max_connections(max_pending_checkins: int) -> int:
    """The connection cap when none is configured: every held check-in holds a connection, plus 1024 for
    uploads, downloads and probes, but never within ``FD_RESERVE`` of the open-file limit."""
    return max(1, min(max_pending_checkins + 1024, open_file_limit() - FD_RESERVE))


def open_file_limit() -> int:
    """The process's soft limit on open files (``ulimit -n``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _refusal_bytes() -> bytes:
    body = json.dumps(Overloaded("too many open connections; retry later", retry_after=RETRY_AFTER).to_json())
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER}\r\nConnection: close\r\n\r\n")
    return (head + body).encode()


REFUSAL = _refusal_bytes()


class _Refused(asyncio.Protocol):
    """A connection past the cap: answered 503 at once, closed when its request has come (reading it first
    avoids a reset that could destroy the answer) or after ``REFUSAL_LINGER`` seconds."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's, or uvloop's, which does not subclass asyncio.Transport).
        stream = self._transport = cast(asyncio.Transport, transport)
        stream.write(REFUSAL)
        if stream.can_write_eof():
            stream.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, stream.abort)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Tracked(asyncio.Protocol):
    """An accepted connection: aiohttp's handler behind a thin wrapper that counts it and gives its first
    request ``header_timeout`` seconds to arrive."""

    __slots__ = ("_asked", "_site", "_timer", "_transport", "handler")

    def __init__(self, site: DeviceSite, handler: RequestHandler) -> None:
        self._site = site
        self.handler = handler
        self._asked = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # asyncio's or uvloop's stream transport
        self._site.connections[self.handler] = self
        self.handler.connection_made(transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._site.header_timeout, self._header_deadline)

    def asked(self) -> None:
        """A request's headers are complete (called from aiohttp's request factory)."""
        self._asked = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_deadline(self) -> None:
        self._timer = None
        if not self._asked and self._transport is not None:
            log.debug("closing a connection that sent no complete request in %g s", self._site.header_timeout)
            self._transport.abort()  # not close(): a TLS close would wait for the silent peer's close_notify

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()  # aiohttp's returns None: the transport closes after the EOF

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._site.connections.pop(self.handler, None)
        self.handler.connection_lost(exc)


class DeviceSite(web.BaseSite):
    """A TCP site (like aiohttp's ``TCPSite``) with a connection cap and a header timeout."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, max_connections: int,
                 header_timeout: float, ssl_context: ssl.SSLContext | None = None, backlog: int = 1024) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host = host
        self.requested_port = port
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.connections: dict[RequestHandler, _Tracked] = {}
        self.refused = 0
        self._refusals_logged = once_per(60.0)
        server = runner.server
        assert server is not None
        self._handlers = server
        # The request factory runs once a request's headers are complete: that is what the header timeout
        # waits for. (``Server.request_factory`` is public; handlers copy it when they are made.)
        make_request: Callable[..., web.BaseRequest] = server.request_factory

        def requested(message: Any, payload: Any, protocol: RequestHandler, *args: Any,
                      **kwargs: Any) -> web.BaseRequest:
            tracked = self.connections.get(protocol)
            if tracked is not None:
                tracked.asked()
            return make_request(message, payload, protocol, *args, **kwargs)

        server.request_factory = requested

    @property
    def name(self) -> str:
        """The site's URL."""
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the requested one before start)."""
        sockets = getattr(self._server, "sockets", None) or []
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        return self.requested_port

    def _accept(self) -> asyncio.BaseProtocol:
        """Protocol factory: a tracked aiohttp handler, or a refusal past the cap."""
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            suppressed = self._refusals_logged()
            if suppressed is not None:
                log.warning("%d connections open (max_connections): answering new ones 503 overloaded%s",
                            len(self.connections), f" ({suppressed} more since the last such message)"
                            if suppressed else "")
            return _Refused()
        return _Tracked(self, self._handlers())

    async def start(self) -> None:
        """Listen."""
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accept, self.host, self.requested_port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=True, ssl_handshake_timeout=self.header_timeout if self._ssl_context else None,
            ssl_shutdown_timeout=self.header_timeout if self._ssl_context else None)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for the device site (TLS 1.2 or newer) from PEM files; ``InvalidConfig`` (exit 2)
    naming the file when one cannot be read or they are not a certificate and its key."""
    for option, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise InvalidConfig(f"cannot read {option} {path}: {exc.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # A password callback, so that an encrypted key fails here instead of prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidConfig(f"tls_key {key} is not the key of tls_cert {cert}") from None
        raise InvalidConfig(f"tls_cert {cert} and tls_key {key} must be a PEM certificate (chain) and its "
                            f"unencrypted PEM private key ({exc.reason or exc})") from None
    return context


def accept_error(record: logging.LogRecord) -> str | None:
    """asyncio's "socket.accept() out of system resource" (logged up to 100 times a tick, with a
    traceback each, when the process runs out of file descriptors)."""
    return "accept" if record.getMessage().startswith("socket.accept() out of system resource") else None


ACCEPT_ERRORS = RateLimitFilter(accept_error, interval=10.0)
