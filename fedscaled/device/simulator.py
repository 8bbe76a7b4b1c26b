"""Many simulated devices in one process, against a running daemon, over HTTP only.

Every device is a :class:`~fedscaled.device.client.DeviceClient` with its own data shard, state and
random seed; they share one aiohttp session (with a connection limit), one model cache and a compute
semaphore sized to the CPU count, so a 2-core machine trains a few models at a time while hundreds
of devices wait in check-in.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from fedscaled.device import datasets
from fedscaled.device.artifact_cache import ArtifactCache
from fedscaled.device.client import (
    Behaviour,
    ClientStats,
    DeviceClient,
    DeviceState,
    FineTuneResult,
    ModelCache,
)

EMPTY = datasets.DeviceData(np.zeros((0, 1), np.float32), np.zeros((0,), np.int32),
                            np.zeros((0, 1), np.float32), np.zeros((0,), np.int32))


@dataclass
class SimConfig:
    """Everything a simulation needs (the ``simulate`` subcommand's options)."""

    server: str
    job: str
    enrollment_token: str
    devices: int = 10
    dataset: str = "digits"
    alpha: float = 0.5
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    samples_per_device: int = 50
    dropout: float = 0.0
    hostile: float = 0.0
    slow: float = 0.0
    slow_devices: float = 0.0  # fraction of devices that are always slow (a fixed, seeded set)
    slow_seconds: tuple[float, float] = (5.0, 15.0)
    offline: float = 0.0
    max_seconds: float = 600.0
    concurrency: int = 0
    checkin_timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    shared_cache: bool = True
    credentials: Path | None = None
    backend: str = "jax"  # jax | tflite | mnn | mixed (devices take tflite, mnn, jax in turn)
    ca_file: Path | None = None  # trust these CA certificates (PEM) for an https:// server


SIM_BACKENDS = ("jax", "tflite", "mnn", "mixed")
MIXED_ORDER = ("tflite", "mnn", "jax")


def device_backends(choice: str, index: int) -> tuple[str, ...]:
    """What device ``index`` announces at check-in for the ``--backend`` choice."""
    if choice not in SIM_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SIM_BACKENDS)}, got {choice!r}")
    return (MIXED_ORDER[index % len(MIXED_ORDER)],) if choice == "mixed" else (choice,)


@dataclass
class SimSummary:
    """The outcome of a simulation: summed device counters and how it ended."""

    devices: int
    elapsed: float
    done_state: str | None
    timed_out: bool
    totals: ClientStats = field(default_factory=ClientStats)

    def line(self) -> str:
        """The one-line human summary."""
        t = self.totals
        codes = ",".join(f"{k}:{v}" for k, v in sorted(t.error_codes.items())) or "-"
        return (f"devices={self.devices} state={self.done_state or 'running'} "
                f"timed_out={str(self.timed_out).lower()} elapsed={self.elapsed:.1f}s "
                f"checkins={t.checkins} trained={t.trained} tested={t.tested} "
                f"uploads_accepted={t.uploads_accepted} results_accepted={t.results_accepted} "
                f"duplicates={t.duplicates} dropped={t.dropped_tasks} vanished={t.vanished} poisoned={t.poisoned} "
                f"downloads={t.downloads} cache_hits={t.cache_hits} retries={t.retries} "
                f"errors={t.errors} ({codes})")

    def to_json(self) -> dict[str, Any]:
        """The summary as a JSON-ready dict."""
        return {"devices": self.devices, "elapsed": self.elapsed, "done_state": self.done_state,
                "timed_out": self.timed_out, **asdict(self.totals)}


def sum_stats(all_stats: list[ClientStats]) -> ClientStats:
    """Counters of many devices added up (``done_state``: the first one heard)."""
    total = ClientStats()
    for s in all_stats:
        for name in ("checkins", "waits", "trained", "tested", "uploads_accepted", "results_accepted",
                     "duplicates", "dropped_tasks", "vanished", "poisoned", "downloads", "cache_hits", "retries",
                     "errors"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for code, n in s.error_codes.items():
            total.error_codes[code] = total.error_codes.get(code, 0) + n
        total.done_state = total.done_state or s.done_state
    return total


def state_provider(num_samples: int, offline: float, rng: random.Random,
                   backends: tuple[str, ...] = ("jax",)) -> Callable[[], DeviceState]:
    """Device state that is unplugged/busy (ineligible) a fraction ``offline`` of check-ins."""

    def state() -> DeviceState:
        if rng.random() < offline:
            return DeviceState(battery=rng.randint(5, 60), charging=False, idle=False,
                               unmetered=rng.random() < 0.5, free_storage_mb=2048,
                               num_samples=num_samples, backends=backends)
        return DeviceState(battery=rng.randint(60, 100), charging=True, idle=True, unmetered=True,
                           free_storage_mb=4096, num_samples=num_samples, backends=backends)

    return state


def _connector_limit(cfg: SimConfig) -> int:
    # Check-ins are long polls: with fewer connections than devices, devices queue for a connection
    # and the daemon sees a smaller pool. One connection per device unless told otherwise.
    return cfg.concurrency if cfg.concurrency > 0 else max(1, cfg.devices)


def make_connector(cfg: SimConfig) -> aiohttp.TCPConnector:
    """The devices' connection pool; https:// servers are verified against ``ca_file`` or the system's CAs."""
    tls: ssl.SSLContext | bool = True
    if cfg.ca_file is not None:
        try:
            tls = ssl.create_default_context(cafile=str(cfg.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use --ca-file {cfg.ca_file}: {exc}") from None
    return aiohttp.TCPConnector(limit=_connector_limit(cfg), ssl=tls)


def _load_credentials(path: Path | None) -> list[dict[str, str]]:
    if path is None or not path.exists():
        return []
    loaded: list[dict[str, str]] = json.loads(path.read_text())
    return loaded


def _save_credentials(path: Path | None, clients: list[DeviceClient]) -> None:
    if path is None:
        return
    creds = [{"device_id": c.device_id, "token": c.token} for c in clients if c.token]
    path.write_text(json.dumps(creds, indent=1))
    path.chmod(0o600)  # Bearer tokens: only the owner may read them.


def _make_clients(cfg: SimConfig, session: aiohttp.ClientSession, deadline: float,
                  stop: asyncio.Event) -> list[DeviceClient]:
    shared = ModelCache(max_entries=2) if cfg.shared_cache else None
    artifacts = ArtifactCache() if cfg.shared_cache else None
    compute = asyncio.Semaphore(max(1, os.cpu_count() or 1))
    creds = _load_credentials(cfg.credentials)
    clients = []
    # A fixed, seeded set of hostile devices (not a per-task coin flip: attackers persist).
    hostile = set(random.Random(cfg.seed).sample(range(cfg.devices), round(cfg.hostile * cfg.devices)))
    # Likewise slow phones: a property of the device, which a selector (Oort) can learn.
    slow = set(random.Random(cfg.seed + 1).sample(range(cfg.devices), round(cfg.slow_devices * cfg.devices)))
    for i in range(cfg.devices):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        cred = creds[i] if i < len(creds) else {}
        clients.append(DeviceClient(
            session, cfg.server, cfg.job, EMPTY, enrollment_token=cfg.enrollment_token,
            device_id=cred.get("device_id"), token=cred.get("token"),
            behaviour=Behaviour(cfg.dropout, cfg.slow, cfg.slow_seconds, hostile=i in hostile, always_slow=i in slow),
            seed=cfg.seed * 100_003 + i,
            cache=shared if shared is not None else ModelCache(max_entries=1),
            checkin_timeout=cfg.checkin_timeout, backoff_base=cfg.backoff_base,
            backoff_cap=cfg.backoff_cap, deadline=deadline, stop=stop, compute=compute,
            device_info={"model": "fedscaled-sim", "os": "python", "index": str(i)},
            backends=device_backends(cfg.backend, i), artifacts=artifacts))
        clients[-1].rng = rng
    return clients


async def _prepare(cfg: SimConfig, clients: list[DeviceClient]) -> None:
    """Enroll the first device, learn the model from the daemon, and hand every device its data."""
    probe = clients[0]
    await probe.ensure_enrolled()
    info = await probe.model_info()
    shape = tuple(int(d) for d in info["input_shape"])
    classes = int(info["num_classes"])
    if cfg.input_shape is not None and tuple(cfg.input_shape) != shape:
        raise ValueError(f"--input-shape {cfg.input_shape} differs from the job's model input {shape}")
    if cfg.num_classes is not None and cfg.num_classes != classes:
        raise ValueError(f"--num-classes {cfg.num_classes} differs from the job's model ({classes})")
    data = datasets.device_datasets(cfg.dataset, cfg.devices, cfg.alpha, cfg.seed, input_shape=shape,
                                    num_classes=classes, samples_per_device=cfg.samples_per_device)
    offline_rng = random.Random(cfg.seed)
    for client, d in zip(clients, data, strict=True):
        client.data = d
        client.state = state_provider(d.num_train, cfg.offline, random.Random(offline_rng.random()),
                                      client.backends)


async def simulate(cfg: SimConfig) -> SimSummary:
    """Run ``cfg.devices`` devices until the job is over or ``cfg.max_seconds`` pass."""
    started = time.monotonic()
    deadline = started + cfg.max_seconds
    stop = asyncio.Event()
    connector = make_connector(cfg)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = _make_clients(cfg, session, deadline, stop)
        await _prepare(cfg, clients)

        async def run_one(client: DeviceClient) -> ClientStats:
            stats = await client.run()
            if stats.done_state is not None:
                stop.set()  # The job is over for everyone: wake devices sleeping in retry windows.
            return stats

        all_stats = await asyncio.gather(*(run_one(c) for c in clients))
        _save_credentials(cfg.credentials, clients)
    totals = sum_stats(list(all_stats))
    return SimSummary(cfg.devices, time.monotonic() - started, totals.done_state,
                      totals.done_state is None and time.monotonic() >= deadline, totals)


@dataclass
class FineTuneConfig:
    """Options of the ``fine-tune`` subcommand."""

    sim: SimConfig
    learning_rate: float = 0.05
    local_steps: int = 20
    batch_size: int = 16
    epochs: int = 0
    holdout: float = 0.2


async def fine_tune_fleet(cfg: FineTuneConfig) -> list[FineTuneResult]:
    """Personalize the latest global model on every device; nothing is uploaded.

    Each device trains on its training shard minus a held-out ``holdout`` fraction of it and
    reports accuracy on that held-out part, i.e. on data from its own (skewed) distribution.
    """
    sim = cfg.sim
    deadline = time.monotonic() + sim.max_seconds
    stop = asyncio.Event()
    connector = make_connector(sim)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = _make_clients(sim, session, deadline, stop)
        await _prepare(sim, clients)
        model_def = clients[0].model_def

        async def one(client: DeviceClient, index: int) -> FineTuneResult:
            d = client.data
            order = np.random.default_rng(sim.seed + index).permutation(d.num_train)
            held = max(1, round(cfg.holdout * d.num_train)) if d.num_train > 1 else 0
            test, tr = order[:held], order[held:]
            client.data = datasets.DeviceData(d.x_train[tr], d.y_train[tr], d.x_test, d.y_test)
            client.model_def = model_def
            return await client.fine_tune(
                lr=cfg.learning_rate, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                epochs=cfg.epochs, x_test=d.x_train[test], y_test=d.y_train[test])

        results = await asyncio.gather(*(one(c, i) for i, c in enumerate(clients)))
        _save_credentials(sim.credentials, clients)
    return list(results)
