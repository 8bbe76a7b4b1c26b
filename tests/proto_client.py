"""A small synchronous client of device protocol v1 (docs/protocol.md) for tests.

Plain ``http.client``, one connection per request, so that a test sees exactly what a phone would:
the status, the headers and the body (parsed JSON when the answer is JSON, raw bytes otherwise).
Nothing here retries or interprets errors; tests assert on the :class:`Reply`.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

# A device state that every test job accepts (charging, unmetered, enough samples).
GOOD_STATE: dict[str, Any] = {"battery": 90, "charging": True, "idle": True, "unmetered": True,
                              "free_storage_mb": 1024, "num_samples": 50, "backends": ["jax"]}


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status, headers (lower-case names) and body (JSON value or bytes)."""

    status: int
    headers: dict[str, str]
    body: Any

    @property
    def error_code(self) -> str | None:
        """``error.code`` of an error body, else None."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return code if isinstance(code, str) else None
        return None

    @property
    def error_details(self) -> dict[str, Any]:
        """``error.details`` of an error body ({} when absent)."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            details = self.body["error"].get("details")
            return details if isinstance(details, dict) else {}
        return {}

    def describe(self) -> str:
        """One line for assertion messages."""
        shown = self.body if not isinstance(self.body, bytes) else f"<{len(self.body)} bytes>"
        return f"HTTP {self.status}: {shown!r}"


def read_reply(response: http.client.HTTPResponse) -> Reply:
    """Read a whole response into a :class:`Reply`."""
    raw = response.read()
    headers = {name.lower(): value for name, value in response.getheaders()}
    body: Any = raw
    if headers.get("content-type", "").startswith("application/json") and raw:
        body = json.loads(raw)
    return Reply(response.status, headers, body)


class ProtoClient:
    """Device-protocol calls against ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None, base_url
        self.host = parts.hostname
        self.port = parts.port
        self.timeout = timeout

    # ------------------------------------------------------------------ plumbing
    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A new connection to the daemon (connected, nothing sent)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        conn.connect()
        return conn

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None, *,
                token: str | None = None, headers: Mapping[str, str] | None = None,
                timeout: float | None = None, chunked: bool = False) -> Reply:
        """Send one request and read its answer. ``chunked``: send an iterable body chunk-encoded."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        conn = self.connect(timeout)
        try:
            conn.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
            return read_reply(conn.getresponse())
        finally:
            conn.close()

    def post_json(self, path: str, payload: Any, *, token: str | None = None,
                  timeout: float | None = None) -> Reply:
        """POST ``payload`` as JSON."""
        return self.request("POST", path, json.dumps(payload).encode(), token=token, timeout=timeout,
                            headers={"Content-Type": "application/json"})

    # ------------------------------------------------------------------ protocol v1
    @staticmethod
    def job_path(job: str, *rest: str) -> str:
        """``/v1/jobs/{job}/...`` with every segment percent-encoded."""
        return "/".join(["/v1/jobs", quote(job, safe=""), *(quote(part, safe="") for part in rest)])

    def enroll(self, job: str, enrollment_token: Any, device_info: Any = None) -> Reply:
        """``POST /v1/jobs/{job}/enroll``."""
        payload: dict[str, Any] = {"enrollment_token": enrollment_token}
        if device_info is not None:
            payload["device_info"] = device_info
        return self.post_json(self.job_path(job, "enroll"), payload)

    def checkin(self, job: str, token: str, state: Mapping[str, Any] | None = None,
                timeout: float | None = None) -> Reply:
        """``POST /v1/jobs/{job}/checkin`` (may be held up to the job's checkin_wait)."""
        return self.post_json(self.job_path(job, "checkin"), dict(state if state is not None else GOOD_STATE),
                              token=token, timeout=timeout)

    def model_info(self, job: str, token: str) -> Reply:
        """``GET /v1/jobs/{job}/model``."""
        return self.request("GET", self.job_path(job, "model"), token=token)

    def model(self, job: str, token: str, version: int | str, etag: str | None = None) -> Reply:
        """``GET /v1/jobs/{job}/models/{version}``, with ``If-None-Match`` when ``etag`` is given."""
        headers = {"If-None-Match": etag} if etag is not None else None
        return self.request("GET", self.job_path(job, "models", str(version)), token=token, headers=headers)

    def upload(self, job: str, token: str | None, task_id: str, body: bytes,
               headers: Mapping[str, str] | None = None) -> Reply:
        """``PUT /v1/jobs/{job}/tasks/{task_id}/update`` with a safetensors body."""
        return self.request("PUT", self.job_path(job, "tasks", task_id, "update"), body, token=token,
                            headers={"Content-Type": "application/octet-stream", **(headers or {})})

    def post_result(self, job: str, token: str, task_id: str, result: Any) -> Reply:
        """``POST /v1/jobs/{job}/tasks/{task_id}/result`` with test counts."""
        return self.post_json(self.job_path(job, "tasks", task_id, "result"), result, token=token)

    def healthz(self) -> Reply:
        """``GET /healthz``."""
        return self.request("GET", "/healthz")

    def openapi(self) -> Reply:
        """``GET /v1/openapi.json``."""
        return self.request("GET", "/v1/openapi.json")

    def metrics_text(self) -> str:
        """``GET /metrics`` as text."""
        reply = self.request("GET", "/metrics")
        assert reply.status == 200, reply.describe()
        assert isinstance(reply.body, bytes)
        return reply.body.decode()


class RawRequest:
    """A request sent piece by piece on one connection: headers now, the body (or none) later.

    For the cases a plain request cannot make: a Content-Length that the body never fills, a client
    that disconnects mid-body, ``Expect: 100-continue``, a request written while the daemon is paused.
    """

    def __init__(self, client: ProtoClient, timeout: float = 10.0) -> None:
        self.conn = client.connect(timeout)

    def warm_up(self) -> None:
        """One complete request first, so that the daemon has accepted this connection and waits on it."""
        self.conn.request("GET", "/healthz")
        reply = read_reply(self.conn.getresponse())
        assert reply.status == 200, reply.describe()

    def send_head(self, method: str, path: str, headers: Mapping[str, str]) -> None:
        """Send the request line and headers (no body)."""
        self.conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            self.conn.putheader(name, value)
        self.conn.endheaders()

    def await_continue(self) -> None:
        """Read the interim ``100 Continue`` answer to ``Expect: 100-continue``."""
        assert self.conn.sock is not None
        received = b""
        while not received.endswith(b"\r\n\r\n"):
            byte = self.conn.sock.recv(1)
            assert byte, f"connection closed before 100 Continue: {received!r}"
            received += byte
        assert received.startswith(b"HTTP/1.1 100"), received

    def send_body(self, data: bytes) -> None:
        """Send (part of) the body."""
        self.conn.send(data)

    def reply(self) -> Reply:
        """Read the final answer."""
        return read_reply(self.conn.getresponse())

    def close(self) -> None:
        """Close the connection (a client that goes away)."""
        self.conn.close()

    def __enter__(self) -> RawRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')

MetricKey = tuple[str, frozenset[tuple[str, str]]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Samples of a Prometheus text exposition: (name, labels) -> value."""
    samples: dict[MetricKey, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = frozenset((k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                          for k, v in _LABEL.findall(labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def sample_key(name: str, **labels: str) -> MetricKey:
    """The key of one sample in :func:`parse_metrics`'s result."""
    return name, frozenset(labels.items())
