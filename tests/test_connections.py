"""The device site under hostile connections (issue: stalled uploads, idle sockets, malformed requests, TLS).

Each finding is reproduced against the real daemon on loopback, with the new timeouts set short through
their daemon options so that the module stays fast.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import safetensors.numpy as st

from fedscaled.daemon.config import load_config
from fedscaled.errors import InvalidConfig
from fedscaled.server import connections
from fedscaled.server.connections import default_max_connections, tls_context
from fedscaled.server.quiet_log import RateLimitFilter
from tests.daemon_proc import DaemonProcess, ctl
from tests.proto_client import ProtoClient

# The main daemon: every bound short. min_body_rate is low so that a trickled body of a few hundred bytes
# (the linear model below) gets a deadline of a few seconds rather than a few milliseconds.
FLAGS = ["--header-timeout", "1", "--keepalive-timeout", "2", "--body-timeout", "1", "--min-body-rate", "200",
         "--max-connections", "40"]


def job_text(name: str, **overrides: Any) -> str:
    keys: dict[str, Any] = {
        "job_name": name, "model": "linear", "input_shape": "4 4 1", "num_classes": 3, "rounds": 3,
        "num_participants": 2, "overcommitment": 2.0, "min_participants": 2, "eval_interval": 100,
        "filter_less": 1, "round_deadline": 60, "selection_window": 5, "checkin_wait": 5, "retry_min": 0.1,
        "retry_max": 0.3, **overrides}
    return "job_conf:\n" + "".join(f"  - {k}: {v}\n" for k, v in keys.items())


TEST_RESULT = {"samples": 20, "correct_top1": 5, "correct_top5": 15, "loss_sum": 20.0}


class Fleet:
    """A submitted job and its enrolled devices (bearer tokens)."""

    def __init__(self, daemon: DaemonProcess, work: Path, name: str, devices: int, **overrides: Any) -> None:
        self.daemon = daemon
        self.job = name
        self.client = ProtoClient(daemon.url, timeout=20)
        path = work / f"{name}.yml"
        path.write_text(job_text(name, **overrides))
        submitted = ctl(daemon.socket_path, "submit", str(path))
        assert submitted.returncode == 0, submitted.stderr
        status = json.loads(ctl(daemon.socket_path, "status", name, "--json").stdout)
        self.tokens = []
        for _ in range(devices):
            reply = self.client.enroll(name, status["enrollment_token"])
            assert reply.status == 201, reply.describe()
            self.tokens.append(str(reply.body["token"]))

    def tasks(self, tokens: list[str], round_: int, within: float = 20.0) -> list[str]:
        """Check every device in (concurrently) until each holds a training task of ``round_``."""
        def one(token: str) -> str:
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                reply = self.client.checkin(self.job, token, timeout=15)
                assert reply.status == 200, reply.describe()
                task = reply.body.get("task")
                if reply.body["action"] == "train" and task["round"] == round_:
                    return str(task["task_id"])
                if reply.body["action"] == "test":  # the initial model is tested before round 1
                    self.client.post_result(self.job, token, task["task_id"], TEST_RESULT)
                else:
                    time.sleep(0.1)
            raise AssertionError(f"no round-{round_} task within {within} s")

        with ThreadPoolExecutor(len(tokens)) as pool:
            return list(pool.map(one, tokens))

    def body(self, token: str, version: int = 0) -> bytes:
        reply = self.client.model(self.job, token, version)
        assert reply.status == 200, reply.describe()
        weights = {k: (v + np.float32(0.01)).astype(np.float32) for k, v in st.load(reply.body).items()}
        return bytes(st.save(weights, metadata={"samples": "10", "loss": "0.5"}))

    def upload(self, token: str, task_id: str, body: bytes) -> Any:
        return self.client.upload(self.job, token, task_id, body)

    def start_upload(self, token: str, task_id: str, body: bytes, sent: int) -> Raw:
        """An upload whose headers and first ``sent`` bytes go out now; the rest never (unless sent)."""
        raw = Raw(self.daemon.port)
        path = self.client.job_path(self.job, "tasks", task_id, "update")
        raw.send(f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:sent])
        return raw

    def status(self) -> dict[str, Any]:
        return dict(json.loads(ctl(self.daemon.socket_path, "status", self.job, "--json").stdout))


class Raw:
    """A plain socket to the daemon: send bytes as they are, read one answer, see when the daemon closes."""

    def __init__(self, port: int | None, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", int(port or 0)), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of the next answer."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"closed before an answer: {self.buffer!r}"
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            assert self._fill(), "closed mid-answer"
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return int(lines[0].split()[1]), headers, rest[:length]

    def closed_after(self, limit: float = 15.0) -> float:
        """Seconds until the daemon closes the connection (reading and dropping what it sends)."""
        began = time.monotonic()
        self.sock.settimeout(limit)
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        return time.monotonic() - began

    def close(self) -> None:
        self.sock.close()


def healthz(port: int | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", int(port or 0), timeout=10)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("conn") / "state", extra=FLAGS) as proc:
        yield proc


# ---------------------------------------------------------------------------------------------- finding 1
def test_stalled_and_trickled_uploads_lose_their_slots(daemon: DaemonProcess, tmp_path: Path) -> None:
    fleet = Fleet(daemon, tmp_path, "stall", 4)
    a, b, c, d = fleet.tokens
    tasks = fleet.tasks(fleet.tokens, 1)
    body = fleet.body(a)
    # A sends 100 bytes and goes silent; B trickles a byte every 0.25 s (never silent for a whole second).
    stalled = fleet.start_upload(a, tasks[0], body, 100)
    trickled = fleet.start_upload(b, tasks[1], body, 100)
    stop = threading.Event()

    def trickle() -> None:
        for i in range(100, len(body) - 1):
            if stop.wait(0.25):
                return
            try:
                trickled.send(body[i:i + 1])
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        # Both hold the round's two result slots: an honest upload is told to come back...
        refused = fleet.upload(c, tasks[2], fleet.body(c))
        assert (refused.status, refused.error_code) == (503, "overloaded"), refused.describe()
        assert refused.headers.get("retry-after") == "2"
        # ...but only until the silent one hits body_timeout (1 s) and the slow one its rate deadline
        # (1 s + size / 200 bytes/s); each is answered 422 and its slot is free again.
        began = time.monotonic()
        status, _, answer = stalled.reply()
        assert status == 422 and b"no data for 1 s" in answer, answer
        assert time.monotonic() - began < 2.5
        status, _, answer = trickled.reply()
        assert status == 422 and b"slower than 200 bytes/s" in answer, answer
        assert time.monotonic() - began < 1 + len(body) / 200 + 1.5
        assert [fleet.upload(t, k, fleet.body(t)).status for t, k in ((c, tasks[2]), (d, tasks[3]))] == [200, 200]
        deadline = time.monotonic() + 10
        while not fleet.status()["metrics"]:
            assert time.monotonic() < deadline, "round 1 did not close"
            time.sleep(0.1)
        assert fleet.status()["metrics"][0]["participants"] == 2
    finally:
        stop.set()
        thread.join(5)
        stalled.close()
        trickled.close()


def test_a_result_still_arriving_from_the_last_round_takes_no_slot_of_the_next(tmp_path: Path) -> None:
    # body_timeout is long here: the stalled upload outlives its round. The next round must not count it.
    with DaemonProcess(tmp_path / "state", extra=["--body-timeout", "60"]) as slow:
        fleet = Fleet(slow, tmp_path, "carry", 3, overcommitment=1.5, min_participants=1, round_deadline=3)
        a, b, c = fleet.tokens
        first = fleet.tasks(fleet.tokens, 1)
        stalled = fleet.start_upload(a, first[0], fleet.body(a), 100)
        try:
            time.sleep(0.3)
            assert fleet.upload(b, first[1], fleet.body(b)).status == 200
            # Round 1 closes at its deadline with B's update (A's upload still hangs); all three devices,
            # A too (on another connection), are chosen for round 2, which wants two updates.
            second = fleet.tasks(fleet.tokens, 2)
            body = fleet.body(b, 1)
            replies = [fleet.upload(b, second[1], body), fleet.upload(c, second[2], body)]
            assert [r.status for r in replies] == [200, 200], [r.describe() for r in replies]
            deadline = time.monotonic() + 5
            while len(fleet.status()["metrics"]) < 2:
                assert time.monotonic() < deadline, "round 2 did not close at its target"
                time.sleep(0.1)
            assert fleet.status()["metrics"][1]["participants"] == 2
        finally:
            stalled.close()


# ---------------------------------------------------------------------------------------------- finding 2
def test_idle_and_half_sent_connections_are_closed(daemon: DaemonProcess) -> None:
    idle = Raw(daemon.port)
    half_head = Raw(daemon.port)
    half_head.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    kept_alive = Raw(daemon.port)
    kept_alive.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept_alive.reply()[0] == 200
    half_body = Raw(daemon.port)
    half_body.send(b"POST /v1/jobs/nope/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
    with ThreadPoolExecutor(4) as pool:
        waits = [pool.submit(raw.closed_after) for raw in (idle, half_head, kept_alive)]
        status, _, answer = half_body.reply()
        body_wait = pool.submit(half_body.closed_after)
        idle_s, head_s, alive_s = (w.result() for w in waits)
    assert 0.8 < idle_s < 2.5 and 0.8 < head_s < 2.5, (idle_s, head_s)  # header_timeout 1 s
    assert 1.5 < alive_s < 3.5, alive_s  # keepalive_timeout 2 s after the answer
    assert status == 400 and b"truncated body" in answer, answer
    assert body_wait.result() < 2.5  # answered, then the unread rest is drained for at most body_timeout


def test_connections_past_the_cap_get_503_and_health_returns(daemon: DaemonProcess) -> None:
    held = [Raw(daemon.port) for _ in range(40)]
    try:
        time.sleep(0.3)
        extra = Raw(daemon.port)
        extra.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = extra.reply()
        assert (status, headers.get("retry-after")) == (503, "5")
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert extra.closed_after(3) < 2
        # The held connections never asked anything: header_timeout closes them and the daemon serves again.
        assert max(raw.closed_after(5) for raw in held) < 2.5
        assert healthz(daemon.port) == 200
    finally:
        for raw in held:
            raw.close()
    assert daemon.log().count("answering new ones 503 overloaded") == 1


def test_default_connection_cap_stays_below_the_open_file_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections, "open_file_limit", lambda: 1024)
    assert default_max_connections(20000) == 1024 - 128
    monkeypatch.setattr(connections, "open_file_limit", lambda: 65536)
    assert default_max_connections(20000) == 21024


class LowFileLimit(DaemonProcess):
    """The daemon under ``ulimit -n 256``."""

    def command(self) -> list[str]:
        return ["/bin/sh", "-c", 'ulimit -n 256 && exec "$0" "$@"', *super().command()]


def test_running_out_of_file_descriptors_logs_one_line_and_recovers(tmp_path: Path) -> None:
    # A cap set above the file limit (the daemon warns): accept() fails with EMFILE, which asyncio logs
    # with a traceback up to 100 times per loop pass. The filter leaves one line per 10 s.
    with LowFileLimit(tmp_path / "state", extra=["--max-connections", "1000", "--header-timeout", "2"]) as proc:
        socks = [socket.create_connection(("127.0.0.1", int(proc.port or 0)), timeout=5) for _ in range(400)]
        time.sleep(1.5)
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if healthz(proc.port) == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the daemon did not serve again"
            time.sleep(0.2)
        log = proc.log()
    assert "is above the open-file limit" in log
    assert 1 <= log.count("socket.accept() out of system resource") <= 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert len(log) < 20_000


# ---------------------------------------------------------------------------------------------- finding 3
GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",  # a TLS hello
    b"GET / HTTP/1.1\r\nBad\x01Header: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /v1/jobs/x/enroll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nBR\x00KEN / HTTP/1.1\r\n\r\n",  # bad second request
]


def test_malformed_requests_get_400_and_at_most_one_log_line(daemon: DaemonProcess) -> None:
    before = len(daemon.log())
    for data in GARBAGE * 10:
        raw = Raw(daemon.port)
        raw.send(data)
        status = raw.reply()[0]
        if status == 200:  # the valid first request of the last case
            status = raw.reply()[0]
        assert status == 400, data[:40]
        raw.close()
    time.sleep(0.2)
    log = daemon.log()[before:]
    assert "Traceback" not in log, log[:3000]
    lines = [line for line in log.splitlines() if "Error handling request" in line]
    assert len(lines) == 1 and len(log) < 1000, log[:3000]
    assert healthz(daemon.port) == 200


def test_rate_limit_filter_lets_one_line_through_per_interval() -> None:
    now = [0.0]
    limiter = RateLimitFilter(lambda r: "k" if r.msg.startswith("boom") else None, interval=10,
                              clock=lambda: now[0], level=logging.WARNING)

    def record(msg: str) -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError as exc:
            return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (OSError, exc, None))

    first = record("boom\nsocket: x")
    assert limiter.filter(first) and first.exc_info is None and first.levelno == logging.WARNING
    assert first.getMessage() == "boom: OSError: '[Errno 24] Too many open files'"
    assert not limiter.filter(record("boom")) and not limiter.filter(record("boom"))
    assert limiter.filter(record("other"))
    now[0] = 11.0
    later = record("boom")
    assert limiter.filter(later) and "(2 more like it in the last 10 s not logged)" in later.getMessage()


# ---------------------------------------------------------------------------------------------- options
def test_connection_options_are_checked(tmp_path: Path) -> None:
    config = load_config({"data_dir": str(tmp_path), "header_timeout": "3", "min_body_rate": "1000"}, environ={})
    assert (config.header_timeout, config.min_body_rate, config.max_connections) == (3.0, 1000, None)
    for flags in ({"body_timeout": "0"}, {"keepalive_timeout": "-1"}, {"header_timeout": "nan"},
                  {"max_connections": "0"}, {"min_body_rate": "fast"}, {"tls_cert": "c.pem"}):
        with pytest.raises(InvalidConfig):
            load_config({"data_dir": str(tmp_path), **flags}, environ={})


# ---------------------------------------------------------------------------------------------- TLS
def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl's command line; the test environment
    has no ``cryptography`` package)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is available to make a certificate")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_https_device_site_and_reference_client(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "site")
    with DaemonProcess(tmp_path / "state", extra=["--tls-cert", str(cert), "--tls-key", str(key),
                                                  "--header-timeout", "1"]) as proc:
        url = f"https://127.0.0.1:{proc.port}"
        assert f"devices on {url}," in proc.log()
        trusted = ssl.create_default_context(cafile=str(cert))
        conn = http.client.HTTPSConnection("127.0.0.1", int(proc.port or 0), context=trusted, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted = http.client.HTTPSConnection("127.0.0.1", int(proc.port or 0), timeout=10)
            untrusted.request("GET", "/healthz")
        # Plain HTTP to the TLS port: dropped, and nothing in the log.
        plain = Raw(proc.port)
        plain.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.closed_after(5) < 3
        # The reference device (fedscaled-device --ca-file) enrolls and reads the model over HTTPS.
        path = tmp_path / "tls.yml"
        path.write_text(job_text("tls"))
        assert ctl(proc.socket_path, "submit", str(path)).returncode == 0
        token = json.loads(ctl(proc.socket_path, "status", "tls", "--json").stdout)["enrollment_token"]
        assert asyncio.run(_device_over_https(url, token, cert)) == [4, 4, 1]
        assert "Traceback" not in proc.log()


async def _device_over_https(url: str, enrollment_token: str, ca_file: Path) -> list[int]:
    from fedscaled.device.client import DeviceClient
    from fedscaled.device.simulator import EMPTY, SimConfig, make_connector

    config = SimConfig(server=url, job="tls", enrollment_token=enrollment_token, ca_file=ca_file)
    async with aiohttp.ClientSession(connector=make_connector(config)) as session:
        device = DeviceClient(session, url, "tls", EMPTY, enrollment_token=enrollment_token, max_attempts=1)
        await device.ensure_enrolled()
        info = await device.model_info()
    return [int(d) for d in info["input_shape"]]


def test_bad_tls_files_stop_the_start_with_exit_2(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "one")
    other_cert, other_key = make_cert(tmp_path, "two")
    with pytest.raises(InvalidConfig, match="cannot read tls_key"):
        tls_context(cert, tmp_path / "missing.key")
    with pytest.raises(InvalidConfig, match="PEM"):
        tls_context(tmp_path / "one.key", tmp_path / "one.key")
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "locked.key"
        unreadable.write_bytes(key.read_bytes())
        unreadable.chmod(0)
        with pytest.raises(InvalidConfig, match="Permission denied"):
            tls_context(cert, unreadable)
    with pytest.raises(InvalidConfig, match="is not the key of"):
        tls_context(other_cert, key)
    # The real start with a certificate and another's key (a certificate alone: see the options test).
    proc = DaemonProcess(tmp_path / "state", extra=["--tls-cert", str(cert), "--tls-key", str(other_key)])
    done = subprocess.run(proc.command(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "is not the key of" in done.stderr, (done.returncode, done.stderr)
    assert not (tmp_path / "state" / "store").exists(), "a bad TLS option must stop the start before the store"
