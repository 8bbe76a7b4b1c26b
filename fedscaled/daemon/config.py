"""The daemon's configuration: defaults < ``--config daemon.yml`` < ``FEDSCALED_<NAME>`` < flags.

One :class:`DaemonConfig` is built at start and passed explicitly to every part (no globals).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from fedscaled.ctl.protocol import default_data_dir, default_socket
from fedscaled.errors import InvalidConfig
from fedscaled.server.deadlines import DEFAULT_BODY_TIMEOUT, DEFAULT_MIN_BODY_RATE

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_PORT = 29500  # FedScale's port


@dataclass(frozen=True)
class DaemonConfig:
    """Everything ``fedscaled start`` needs; see ``fedscaled start --help``."""

    data_dir: Path
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    control_socket: Path | None = None
    socket_group: str | None = None
    log_level: str = "info"
    shutdown_timeout: float = 10.0
    max_pending_checkins: int = 20000
    max_model_params: int = 50_000_000
    artifact_dir: Path | None = None
    # The device site's connections and request bodies (docs/config.md; fedscaled/server/connections.py).
    header_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    max_connections: int | None = None  # None: min(max_pending_checkins + 1024, open-file limit - 128)
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def socket_path(self) -> Path:
        """The control socket path (explicit, or the default for the data dir)."""
        return self.control_socket if self.control_socket is not None else default_socket(self.data_dir)

    @property
    def artifact_path(self) -> Path:
        """Folder searched for on-device artifacts before the package's prebuilt ones."""
        return self.artifact_dir if self.artifact_dir is not None else self.data_dir / "artifacts"

    @property
    def listen(self) -> str:
        """``HOST:PORT`` as given."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# Option name (as in the YAML file and the environment variable suffix) → field name.
OPTIONS = {
    "data_dir": "data_dir",
    "listen": "listen",
    "control_socket": "control_socket",
    "socket_group": "socket_group",
    "log_level": "log_level",
    "shutdown_timeout": "shutdown_timeout",
    "max_pending_checkins": "max_pending_checkins",
    "max_model_params": "max_model_params",
    "artifact_dir": "artifact_dir",
    "header_timeout": "header_timeout",
    "keepalive_timeout": "keepalive_timeout",
    "body_timeout": "body_timeout",
    "min_body_rate": "min_body_rate",
    "max_connections": "max_connections",
    "tls_cert": "tls_cert",
    "tls_key": "tls_key",
}
SECONDS_OPTIONS = ("header_timeout", "keepalive_timeout", "body_timeout")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidConfig(f"listen must be HOST:PORT, got {value!r}")
    try:
        number = int(port)
    except ValueError:
        raise InvalidConfig(f"listen port must be an integer, got {port!r}") from None
    if not 0 <= number <= 65535:
        raise InvalidConfig(f"listen port must be 0-65535, got {number}")
    return host, number


def _apply(values: dict[str, Any], name: str, raw: Any, origin: str) -> None:
    if name not in OPTIONS:
        known = ", ".join(OPTIONS)
        raise InvalidConfig(f"unknown daemon option {name!r} in {origin} (known: {known})")
    if raw is None:
        return
    if name in ("data_dir", "control_socket", "artifact_dir", "tls_cert", "tls_key"):
        values[name] = Path(str(raw)).expanduser()
    elif name == "listen":
        values["listen_host"], values["listen_port"] = parse_listen(str(raw))
    elif name == "log_level":
        level = str(raw).lower()
        if level not in LOG_LEVELS:
            raise InvalidConfig(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {raw!r} ({origin})")
        values[name] = level
    elif name == "shutdown_timeout":
        try:
            values[name] = float(raw)
        except ValueError:
            raise InvalidConfig(f"shutdown_timeout must be a number, got {raw!r} ({origin})") from None
    elif name in SECONDS_OPTIONS:
        try:
            values[name] = float(raw)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{name} must be a number of seconds, got {raw!r} ({origin})") from None
        if not 0 < values[name] < float("inf"):
            raise InvalidConfig(f"{name} must be positive, got {raw!r} ({origin})")
    elif name in ("max_pending_checkins", "max_model_params", "min_body_rate", "max_connections"):
        try:
            values[name] = int(raw)
        except ValueError:
            raise InvalidConfig(f"{name} must be an integer, got {raw!r} ({origin})") from None
        if values[name] < 1:
            raise InvalidConfig(f"{name} must be positive, got {raw!r} ({origin})")
    else:
        values[name] = str(raw)


def load_config(flags: Mapping[str, Any], config_file: Path | None = None,
                environ: Mapping[str, str] | None = None) -> DaemonConfig:
    """Merge the sources in precedence order and validate."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    file_path = config_file or (Path(env["FEDSCALED_CONFIG"]) if env.get("FEDSCALED_CONFIG") else None)
    if file_path is not None:
        try:
            doc = yaml.safe_load(file_path.read_text())
        except OSError as exc:
            raise InvalidConfig(f"cannot read daemon config {file_path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise InvalidConfig(f"daemon config {file_path} is not valid YAML: {exc}") from exc
        if doc is not None and not isinstance(doc, dict):
            raise InvalidConfig(f"daemon config {file_path} must be a mapping")
        for name, raw in (doc or {}).items():
            _apply(values, str(name).replace("-", "_"), raw, str(file_path))
    for name in OPTIONS:
        env_name = f"FEDSCALED_{name.upper()}"
        if env.get(env_name):
            _apply(values, name, env[env_name], env_name)
    for name, raw in flags.items():
        _apply(values, name, raw, f"--{name.replace('_', '-')}")
    data_dir = values.pop("data_dir", None) or default_data_dir()
    known = {f.name for f in fields(DaemonConfig)}
    config = DaemonConfig(data_dir=Path(data_dir), **{k: v for k, v in values.items() if k in known})
    if (config.tls_cert is None) != (config.tls_key is None):
        raise InvalidConfig("tls_cert and tls_key go together: give both (HTTPS) or neither (HTTP)")
    return replace(config, data_dir=config.data_dir.absolute())
