"""A small synchronous HTTP client for the control socket (stdlib only, so the CLI starts fast)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedscaled.ctl.protocol import API_VERSION
from fedscaled.errors import ApiVersionMismatch, DaemonNotRunning, FedError, by_code


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(str(self._path))
        self.sock = sock


class ControlClient:
    """Calls the daemon's control API over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float | None = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = -1.0) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket_path, self.timeout if timeout == -1.0 else timeout)
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(
                f"no fedscaled daemon at {self.socket_path} ({exc.strerror}); start it with "
                f"'fedscaled start' or point --socket / FEDSCALED_SOCKET at its control socket") from None
        except PermissionError:
            raise FedError(f"permission denied on {self.socket_path}: the control socket belongs to "
                           f"another user") from None
        if response.status >= 400:
            raise _decode_error(response)
        return response

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON request/response; daemon errors are raised as their catalog class."""
        response = self._open(method, path, body)
        return json.loads(response.read() or b"null")

    def fetch(self, path: str) -> tuple[bytes, dict[str, str]]:
        """A binary response's body and headers."""
        response = self._open("GET", path)
        return response.read(), {k.lower(): v for k, v in response.getheaders()}

    def stream(self, path: str) -> Iterator[dict[str, Any]]:
        """NDJSON lines of a streaming response (no read timeout)."""
        response = self._open("GET", path, timeout=None)
        for line in response:
            if line.strip():
                yield json.loads(line)

    def check_version(self) -> dict[str, Any]:
        """Fail early when the daemon speaks another control-API version."""
        info: dict[str, Any] = self.call("GET", "/v1/version")
        if info.get("api_version") != API_VERSION:
            raise ApiVersionMismatch(f"the daemon speaks control API v{info.get('api_version')}, this "
                                     f"fedscalectl speaks v{API_VERSION}; use matching versions")
        return info


def _decode_error(response: http.client.HTTPResponse) -> FedError:
    raw = response.read()
    try:
        body = json.loads(raw)["error"]
        cls = by_code(body["code"])
        error = cls(body["message"], **body.get("details", {}))
    except (ValueError, KeyError, TypeError):
        error = FedError(f"daemon answered HTTP {response.status}: {raw[:200]!r}")
    return error
