"""An HTTP/1.1 load generator of our own: closed loop (capacity) and open loop (a fixed arrival rate).

Open loop: request *i* is scheduled at a fixed time (Poisson arrivals at ``rate``, from a seeded generator)
and its latency is measured from that scheduled time to the last byte of its answer, so a server that
stalls is charged for every request that queued behind the stall (no coordinated omission). At most
``max_inflight`` requests are outstanding (one per keep-alive connection; HTTP/1.1 without pipelining); a
request whose time comes while all of them are busy is not sent and counts as a *miss*. A request not
answered within ``timeout`` of its scheduled time counts as a *timeout* (its connection is dropped). In the
percentiles every failed request (miss, timeout, error) counts as ``timeout``: "99 % of the scheduled
requests were answered within p99".

Closed loop: ``connections`` connections each send the next request as soon as the previous answer is in:
the server's capacity, as long as the generator is not the bottleneck. To tell, both report the CPU time
of the generator (this process) and of the server (``/proc/PID/stat``): the generator's ceiling is about
requests per generator CPU-second.

The client is a bare ``asyncio.Protocol`` sending pre-built requests and reading ``Content-Length`` bodies
(aiohttp's client costs several times more CPU per request, and on 2 cores the generator shares the
machine with the server). Requests are raw bytes, one per device, used round-robin.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115 (closed by GC: hot path)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def build_requests(host: str, port: int, path: str, tokens: Sequence[str], body: dict[str, Any]) -> list[bytes]:
    """One raw ``POST path`` per token: ``Authorization: Bearer``, a JSON body, keep-alive."""
    data = json.dumps(body).encode()
    return [(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
            for token in tokens]


@dataclass
class LoadStats:
    """What one load run measured (times in seconds)."""

    mode: str  # "open" or "closed"
    offered_rate: float  # requests/s scheduled (open loop); 0 for closed loop
    seconds: float  # the measured window
    timeout: float
    scheduled: int = 0
    ok: int = 0
    errors: int = 0  # a non-2xx answer, an unexpected body, a lost connection
    timeouts: int = 0
    misses: int = 0  # not sent: every connection busy
    latencies: list[float] = field(default_factory=list)  # of the answered requests
    send_lags: list[float] = field(default_factory=list)  # scheduled time to write (the generator's own delay)
    statuses: Counter[int] = field(default_factory=Counter)
    first_error: str = ""
    client_cpu: float = 0.0
    server_cpu: float = float("nan")
    connects: int = 0
    drops: int = 0  # connections the server closed (or that broke)

    @property
    def failed(self) -> int:
        """Requests scheduled in the window that got no good answer in time."""
        return self.errors + self.timeouts + self.misses

    @property
    def rate(self) -> float:
        """Good answers per second of the window."""
        return self.ok / self.seconds if self.seconds > 0 else float("nan")

    def latency(self, q: float) -> float:
        """The q-th percentile over every request of the window, a failed one counting as ``timeout``."""
        values = self.latencies + [self.timeout] * self.failed
        return percentile(values, q)

    @property
    def max_latency(self) -> float:
        """The slowest answer (``timeout`` when any request failed)."""
        return max([*self.latencies, *([self.timeout] if self.failed else [])], default=float("nan"))

    @property
    def server_cpu_per_request(self) -> float:
        """Server CPU seconds per good answer."""
        return self.server_cpu / self.ok if self.ok else float("nan")

    @property
    def client_cpu_per_request(self) -> float:
        """Generator CPU seconds per request sent."""
        sent = self.ok + self.errors + self.timeouts
        return self.client_cpu / sent if sent else float("nan")

    def summary(self) -> dict[str, float]:
        """The figures a report needs, as plain numbers."""
        return {"offered_rate": self.offered_rate, "rate": self.rate, "p50": self.latency(50),
                "p99": self.latency(99), "max": self.max_latency, "scheduled": float(self.scheduled),
                "ok": float(self.ok), "errors": float(self.errors), "timeouts": float(self.timeouts),
                "misses": float(self.misses), "send_lag_p99": percentile(self.send_lags, 99),
                "client_cpu_share": self.client_cpu / self.seconds, "server_cpu_share": self.server_cpu / self.seconds,
                "server_cpu_per_request": self.server_cpu_per_request,
                "client_cpu_per_request": self.client_cpu_per_request, "connects": float(self.connects),
                "drops": float(self.drops)}


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # total bytes of the answer being read, once its head is in
        self.head_end = 0
        self.busy = False
        self.scheduled = 0.0
        self.counted = True  # whether the request in flight falls in the measured window
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, scheduled: float, counted: bool) -> None:
        assert self.transport is not None
        self.busy, self.scheduled, self.counted = True, scheduled, counted
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0 or not self.busy:
                self.load.broken(self, f"unexpected answer: {bytes(buf[:200])!r}")
                return
            stop = head.find(b"\r\n", at + 2)
            self.head_end = end + 4
            self.need = self.head_end + int(head[at + 17:stop if stop >= 0 else None])
        if len(buf) >= self.need:
            status = int(buf[9:12])
            body = bytes(buf[self.head_end:self.need])
            del buf[:self.need]
            self.need = -1
            self.busy = False
            self.load.answered(self, status, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self, exc)
        self.dead = True


class _Load:
    """The shared state of one run: connections, counters, the schedule."""

    def __init__(self, host: str, port: int, requests: Sequence[bytes], expect: bytes, stats: LoadStats,
                 closed: bool) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.expect = expect
        self.stats = stats
        self.closed = closed
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()
        self.connecting = 0
        self.next = 0  # round-robin over the requests (devices)
        self.window = (0.0, math.inf)  # scheduled times counted in the stats
        self.stopping = False

    def request(self) -> bytes:
        request = self.requests[self.next]
        self.next = (self.next + 1) % len(self.requests)
        return request

    async def connect(self) -> _Conn:
        self.connecting += 1
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        finally:
            self.connecting -= 1
        self.stats.connects += 1
        return conn

    def in_window(self, scheduled: float) -> bool:
        return self.window[0] <= scheduled < self.window[1]

    def fire(self, conn: _Conn, scheduled: float) -> None:
        counted = self.in_window(scheduled)
        self.busy.add(conn)
        conn.send(self.request(), scheduled, counted)
        if counted:
            self.stats.send_lags.append(self.loop.time() - scheduled)

    def answered(self, conn: _Conn, status: int, body: bytes) -> None:
        now = self.loop.time()
        self.busy.discard(conn)
        stats = self.stats
        if conn.counted:
            stats.statuses[status] += 1
            if 200 <= status < 300 and self.expect in body:
                stats.ok += 1
                stats.latencies.append(now - conn.scheduled)
            else:
                stats.errors += 1
                stats.first_error = stats.first_error or f"{status}: {body[:200]!r}"
        if self.closed and not self.stopping:
            self.fire(conn, now)
        else:
            self.idle.append(conn)

    def broken(self, conn: _Conn, why: str) -> None:
        self.stats.first_error = self.stats.first_error or why
        self.stats.errors += conn.busy and conn.counted
        self.busy.discard(conn)
        conn.busy, conn.dead = False, True
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        if not (self.stopping or conn.dead):  # dead: we dropped it ourselves
            self.stats.drops += 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn in self.busy:
            self.busy.discard(conn)
            if conn.busy and conn.counted:
                self.stats.errors += 1
                self.stats.first_error = self.stats.first_error or f"connection lost: {exc!r}"
            conn.busy = False

    def expire(self, now: float) -> None:
        """Drop the connections of requests older than the timeout (each counts once, as a timeout)."""
        for conn in [c for c in self.busy if now - c.scheduled > self.stats.timeout]:
            self.busy.discard(conn)
            if conn.counted:
                self.stats.timeouts += 1
            conn.busy, conn.dead = False, True
            if conn.transport is not None:
                conn.transport.abort()

    async def watchdog(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.01)
            self.expire(self.loop.time())

    async def send_fresh(self, scheduled: float) -> None:
        try:
            conn = await self.connect()
        except OSError as exc:
            if self.in_window(scheduled):
                self.stats.errors += 1
                self.stats.first_error = self.stats.first_error or f"connect: {exc!r}"
            return
        if self.loop.time() - scheduled > self.stats.timeout:
            if self.in_window(scheduled):
                self.stats.timeouts += 1
            self.idle.append(conn)
            return
        self.fire(conn, scheduled)

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            if conn.transport is not None:
                conn.transport.abort()


def _server_cpu(pid: int | None) -> float:
    return process_cpu_seconds(pid) if pid is not None else float("nan")


async def _open(host: str, port: int, requests: Sequence[bytes], expect: bytes, rate: float, seconds: float,
                warmup: float, max_inflight: int, timeout: float, seed: int, server_pid: int | None,
                preopen: int) -> LoadStats:
    stats = LoadStats("open", rate, seconds, timeout)
    load = _Load(host, port, requests, expect, stats, closed=False)
    load.idle = list(await asyncio.gather(*(load.connect() for _ in range(min(preopen, max_inflight)))))
    rng = random.Random(seed)
    loop = load.loop
    start = loop.time() + 0.02
    load.window = (start + warmup, start + warmup + seconds)
    end = load.window[1]
    watchdog = loop.create_task(load.watchdog())
    background: set[asyncio.Task[None]] = set()
    cpu0, server0 = time.process_time(), _server_cpu(server_pid)
    at = start
    try:
        while at < end:
            now = loop.time()
            while at <= now and at < end:
                counted = load.in_window(at)
                stats.scheduled += counted
                if load.idle:
                    load.fire(load.idle.pop(), at)
                elif len(load.busy) + load.connecting < max_inflight:
                    task = loop.create_task(load.send_fresh(at))
                    background.add(task)
                    task.add_done_callback(background.discard)
                elif counted:
                    stats.misses += 1
                at += rng.expovariate(rate)
            delay = at - loop.time()
            await asyncio.sleep(delay if delay > 0 else 0)
        # Let the last requests finish (or time out) before reading the clocks.
        drain_until = loop.time() + timeout + 0.05
        while (load.busy or background) and loop.time() < drain_until:
            await asyncio.sleep(0.005)
        stats.client_cpu = time.process_time() - cpu0
        stats.server_cpu = _server_cpu(server_pid) - server0
        # CPU spent in the warm-up and drain is charged to the window's requests: scale it to the window.
        span = loop.time() - start
        stats.client_cpu *= seconds / span
        stats.server_cpu *= seconds / span
    finally:
        load.stopping = True
        load.expire(math.inf)
        watchdog.cancel()
        for task in background:
            task.cancel()
        load.close()
    return stats


async def _closed(host: str, port: int, requests: Sequence[bytes], expect: bytes, connections: int, seconds: float,
                  warmup: float, timeout: float, server_pid: int | None) -> LoadStats:
    stats = LoadStats("closed", 0.0, seconds, timeout)
    load = _Load(host, port, requests, expect, stats, closed=True)
    conns = list(await asyncio.gather(*(load.connect() for _ in range(connections))))
    loop = load.loop
    start = loop.time()
    load.window = (start + warmup, start + warmup + seconds)
    watchdog = loop.create_task(load.watchdog())
    try:
        for conn in conns:
            load.fire(conn, start)
        await asyncio.sleep(warmup)
        cpu0, server0 = time.process_time(), _server_cpu(server_pid)
        await asyncio.sleep(seconds)
        stats.client_cpu = time.process_time() - cpu0
        stats.server_cpu = _server_cpu(server_pid) - server0
        load.stopping = True
        drain_until = loop.time() + timeout
        while load.busy and loop.time() < drain_until:
            await asyncio.sleep(0.005)
    finally:
        load.stopping = True
        load.expire(math.inf)
        watchdog.cancel()
        load.close()
    # Closed loop: every answer whose request was *sent* in the window counts; nothing is scheduled ahead.
    stats.scheduled = stats.ok + stats.errors + stats.timeouts
    return stats


def _quiet_gc(run: Any) -> LoadStats:
    """Run a coroutine with the cyclic GC off: its pauses would be charged to the server's latency."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        stats: LoadStats = asyncio.run(run)
        return stats
    finally:
        if enabled:
            gc.enable()


def open_loop(host: str, port: int, requests: Sequence[bytes], *, rate: float, seconds: float, expect: bytes = b"",
              warmup: float = 0.5, max_inflight: int = 256, timeout: float = 2.0, seed: int = 7,
              server_pid: int | None = None, preopen: int = 32) -> LoadStats:
    """Poisson arrivals at ``rate``/s for ``warmup + seconds``; the stats of the last ``seconds``."""
    return _quiet_gc(_open(host, port, requests, expect, rate, seconds, warmup, max_inflight, timeout, seed,
                           server_pid, preopen))


def closed_loop(host: str, port: int, requests: Sequence[bytes], *, connections: int, seconds: float,
                expect: bytes = b"", warmup: float = 0.5, timeout: float = 10.0,
                server_pid: int | None = None) -> LoadStats:
    """``connections`` back-to-back request loops for ``warmup + seconds``; the stats of the last ``seconds``."""
    return _quiet_gc(_closed(host, port, requests, expect, connections, seconds, warmup, timeout, server_pid))
