"""The reference device: a protocol-v1 client that behaves as an Android app would (docs/protocol.md).

It talks to the daemon only over HTTP. One :class:`DeviceClient` is one phone: it enrolls once and keeps
its token, checks in with its state, honours every retry window, downloads models by version with an
ETag cache, trains or tests with the engine its task names (JAX, or LiteRT / MNN running the job's
downloaded artifact: :mod:`fedscaled.device.backends`), and uploads safetensors. Network
errors and 5xx answers are retried with exponential backoff and jitter, so a daemon restart is survived.
Every loop is bounded by an iteration count and a deadline so that tests and simulations end by
themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedscaled import errors
from fedscaled.core.models import ModelDef
from fedscaled.core.models import build as build_model
from fedscaled.device import train
from fedscaled.device.artifact_cache import ArtifactCache, ArtifactMismatch
from fedscaled.device.backends import ArtifactBackend, Backend
from fedscaled.device.datasets import DeviceData

log = logging.getLogger("fedscaled.device")

NumpyParams = dict[str, np.ndarray]

# Codes after which a task is simply dropped and the device checks in again (protocol.md, upload).
DROP_TASK_CODES = frozenset({errors.WrongRound.code, errors.TaskExpired.code, errors.UnknownTask.code,
                             errors.StaleUpdate.code})
# Codes after which the device stops working for this job.
JOB_OVER_CODES = frozenset({errors.JobNotActive.code, errors.JobNotFound.code})


@dataclass(frozen=True)
class DeviceState:
    """What a device reports at check-in (every field of protocol.md's check-in body)."""

    battery: int = 100
    charging: bool = True
    idle: bool = True
    unmetered: bool = True
    free_storage_mb: int = 4096
    num_samples: int = 0
    backends: tuple[str, ...] = ("jax",)

    def to_json(self) -> dict[str, Any]:
        """The check-in body."""
        return {"battery": self.battery, "charging": self.charging, "idle": self.idle,
                "unmetered": self.unmetered, "free_storage_mb": self.free_storage_mb,
                "num_samples": self.num_samples, "backends": list(self.backends)}


# Called before every check-in, so a simulator can unplug a device or drain its battery over time.
StateProvider = Callable[[], DeviceState]


class ProtocolError(Exception):
    """A 4xx answer (or a 5xx after retries ran out) with the daemon's machine-readable error code."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def error_class(self) -> type[errors.FedError]:
        """The catalog class for this code (the base class for codes this build does not know)."""
        return errors.by_code(self.code)


class ServerUnavailable(Exception):
    """Connection errors or 5xx/429 answers persisted through ``max_attempts`` tries."""


class Stopped(Exception):
    """The client's deadline passed or its stop event was set while it was waiting."""


@dataclass
class ClientStats:
    """Counters of one device's run; summed by the simulator."""

    checkins: int = 0
    waits: int = 0
    trained: int = 0
    tested: int = 0
    uploads_accepted: int = 0
    results_accepted: int = 0
    duplicates: int = 0
    dropped_tasks: int = 0
    vanished: int = 0
    abandoned: int = 0  # tasks this device gave up (it could not do them)
    poisoned: int = 0
    downloads: int = 0
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0
    done_state: str | None = None
    error_codes: dict[str, int] = field(default_factory=dict)

    def count_error(self, code: str) -> None:
        """Count one error, by code."""
        self.errors += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1


HOSTILE_SCALE = 100.0  # standard deviation of a hostile device's random weights


@dataclass(frozen=True)
class Behaviour:
    """Fault injection for simulations: how unreliable this device is."""

    dropout: float = 0.0  # probability that an accepted training task is never uploaded
    slow: float = 0.0  # probability that the device sleeps before uploading
    slow_seconds: tuple[float, float] = (5.0, 15.0)  # how long a slow device sleeps
    hostile: bool = False  # uploads poisoned weights (large random values) and inflates its sample count
    always_slow: bool = False  # a slow phone: every training task takes slow_seconds longer


@dataclass(frozen=True)
class FineTuneResult:
    """Outcome of :meth:`DeviceClient.fine_tune`: local test accuracy before and after."""

    model_version: int
    accuracy_before: float
    accuracy_after: float
    samples: int
    loss: float
    backend: str = "jax"


class ModelCache:
    """Model files by (job, version), with their ETag and decoded tensors; least recently used first out.

    Versions are immutable, but the client still asks the daemon with ``If-None-Match`` (a 304 costs
    no body) so that a pruned version is noticed. A simulator may share one cache among its devices.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[tuple[str, int], tuple[str, NumpyParams]] = OrderedDict()

    def get(self, job: str, version: int) -> tuple[str, NumpyParams] | None:
        """The cached (etag, tensors) of a version, or None."""
        key = (job, version)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, job: str, version: int, etag: str, tensors: NumpyParams) -> None:
        """Remember a downloaded version, evicting the least recently used beyond ``max_entries``."""
        self._entries[(job, version)] = (etag, tensors)
        self._entries.move_to_end((job, version))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def encode_update(params: NumpyParams, order: list[str], *, samples: int, loss: float,
                  duration: float, utility: float | None = None) -> bytes:
    """A training upload: the trained weights as safetensors with protocol metadata (string values)."""
    metadata = {"samples": str(int(samples)), "loss": repr(float(loss)), "duration": repr(float(duration))}
    if utility is not None:
        metadata["utility"] = repr(float(utility))
    tensors = {name: np.ascontiguousarray(params[name], dtype=np.float32) for name in order}
    data: bytes = st_save(tensors, metadata=metadata)
    return data


def decode_model(body: bytes) -> NumpyParams:
    """Tensors of a downloaded safetensors model file."""
    tensors: NumpyParams = st_load(body)
    return tensors


class DeviceClient:
    """One simulated phone in one job (see the module docstring and docs/protocol.md).

    ``session`` is shared among many clients in a simulation. ``device_id``/``token`` may be given to
    resume an earlier enrollment. ``deadline`` (``time.monotonic()`` seconds) bounds every wait and
    retry; ``stop`` ends a run early when set (a simulator sets it once any device hears "done").
    ``backends`` are the engines it announces at check-in, most preferred first; ``artifacts`` caches
    downloaded artifacts by hash and may be shared by a simulator's devices.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: str,
        job: str,
        data: DeviceData,
        *,
        enrollment_token: str | None = None,
        device_id: str | None = None,
        token: str | None = None,
        state: StateProvider | None = None,
        behaviour: Behaviour | None = None,
        seed: int = 0,
        cache: ModelCache | None = None,
        checkin_timeout: float = 60.0,
        request_timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        max_attempts: int = 12,
        deadline: float | None = None,
        stop: asyncio.Event | None = None,
        compute: asyncio.Semaphore | None = None,
        device_info: dict[str, str] | None = None,
        backends: tuple[str, ...] = ("jax",),
        artifacts: ArtifactCache | None = None,
    ) -> None:
        self.session = session
        self.server = server.rstrip("/")
        self.job = job
        self.data = data
        self.enrollment_token = enrollment_token
        self.device_id = device_id
        self.token = token
        self.backends = tuple(backends)
        self.state = state or (lambda: DeviceState(num_samples=data.num_train, backends=self.backends))
        self.artifacts = artifacts if artifacts is not None else ArtifactCache()
        self.behaviour = behaviour or Behaviour()
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.seed = seed
        self.cache = cache if cache is not None else ModelCache(max_entries=1)
        self.checkin_timeout = checkin_timeout
        self.request_timeout = request_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.stop = stop or asyncio.Event()
        self.compute = compute
        self.device_info = device_info or {"model": "fedscaled-sim", "os": "python"}
        self.stats = ClientStats()
        self.model_def: ModelDef | None = None
        self.model_order: list[str] = []
        self._tasks_done = 0

    # ---- waiting -----------------------------------------------------------------------------------

    def _remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early (raising :class:`Stopped`) at the deadline or when ``stop`` is set."""
        if self.stop.is_set() or self._remaining() <= 0:
            raise Stopped()
        delay = max(0.0, min(seconds, self._remaining()))
        # Waking on ``stop`` lets a whole fleet end at once when one device hears "done".
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=delay)
        if self.stop.is_set() or self._remaining() <= 0:
            raise Stopped()

    def backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: base·2^attempt capped, times a uniform factor in [0.5, 1]."""
        return float(min(self.backoff_cap, self.backoff_base * 2.0 ** attempt)) * self.rng.uniform(0.5, 1.0)

    def retry_window_delay(self, window: Any) -> float:
        """A uniformly random delay in a ``retry_after: {min, max}`` window (protocol.md)."""
        try:
            lo, hi = float(window["min"]), float(window["max"])
        except (KeyError, TypeError, ValueError):
            lo, hi = 1.0, 5.0  # A malformed window must not make the fleet hammer the daemon.
        lo = max(0.0, lo)
        return self.rng.uniform(lo, max(lo, hi))

    # ---- HTTP --------------------------------------------------------------------------------------

    def _headers(self, auth: bool) -> dict[str, str]:
        if not auth:
            return {}
        if self.token is None:
            raise ProtocolError(401, errors.Unauthorized.code, "device is not enrolled")
        return {"Authorization": f"Bearer {self.token}"}

    async def request(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None, auth: bool = True, timeout: float | None = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One protocol request with retries; returns ``(status, headers, body)`` for a status in ``ok``.

        Connection errors, timeouts and 5xx answers are retried with exponential backoff and jitter;
        429/503 with a ``Retry-After`` header wait exactly that long. Every other status raises
        :class:`ProtocolError` with the daemon's error code. Only idempotent requests go through here
        (uploads are idempotent by task id), so a retry after a lost answer is harmless.
        """
        url = f"{self.server}{path}"
        attempt = 0
        while True:
            all_headers = {**self._headers(auth), **(headers or {})}
            wait: float | None = None
            reason = ""
            try:
                async with self.session.request(
                    method, url, json=json, data=data, headers=all_headers,
                    timeout=aiohttp.ClientTimeout(total=timeout or self.request_timeout),
                ) as resp:
                    body = await resp.read()
                    if resp.status in ok:
                        return resp.status, resp.headers.copy(), body  # Case-insensitive.
                    retry_after = _retry_after_header(resp.headers.get("Retry-After"))
                    if resp.status in (429, 503) and retry_after is not None:
                        wait, reason = retry_after, f"{resp.status} Retry-After"
                    elif resp.status >= 500 or resp.status == 429:
                        reason = f"HTTP {resp.status}"
                    else:
                        raise _protocol_error(resp.status, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # ClientResponseError is a ClientError too, but we never raise_for_status.
                reason = f"{type(exc).__name__}: {exc}"
            attempt += 1
            self.stats.retries += 1
            if attempt >= self.max_attempts:
                raise ServerUnavailable(f"{method} {path}: gave up after {attempt} attempts ({reason})")
            delay = wait if wait is not None else self.backoff_delay(attempt - 1)
            log.debug("device %s: %s %s failed (%s); retrying in %.1fs",
                      self.device_id, method, path, reason, delay)
            await self.sleep(delay)  # Raises Stopped at the deadline or when the fleet stops.

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request`, decoding a JSON answer."""
        _, _, body = await self.request(method, path, **kwargs)
        return jsonlib.loads(body)

    # ---- protocol steps ----------------------------------------------------------------------------

    async def enroll(self) -> str:
        """Register with the job's enrollment token; keeps and returns the device id (protocol: enroll)."""
        if self.enrollment_token is None:
            raise ValueError("an enrollment token is needed to enroll")
        answer = await self.request_json(
            "POST", f"/v1/jobs/{self.job}/enroll", auth=False,
            json={"enrollment_token": self.enrollment_token, "device_info": self.device_info})
        self.device_id = str(answer["device_id"])
        self.token = str(answer["token"])
        return self.device_id

    async def ensure_enrolled(self) -> None:
        """Enroll unless a token is already held (a restarted daemon keeps enrollments)."""
        if self.token is None:
            await self.enroll()

    async def model_info(self) -> dict[str, Any]:
        """``GET /v1/jobs/{job}/model``; also builds the zoo model it names (cached on the client)."""
        info: dict[str, Any] = await self.request_json("GET", f"/v1/jobs/{self.job}/model")
        self.model_def = build_model(str(info["model"]), tuple(int(d) for d in info["input_shape"]),
                                     int(info["num_classes"]), float(info.get("width_multiplier", 1.0)))
        self.model_order = [str(t["name"]) for t in info.get("tensors", [])] or [
            name for name, _ in self.model_def.specs]
        return info

    async def checkin(self) -> dict[str, Any]:
        """``POST /v1/jobs/{job}/checkin`` with the current state; the daemon may hold it for a while."""
        self.stats.checkins += 1
        answer: dict[str, Any] = await self.request_json(
            "POST", f"/v1/jobs/{self.job}/checkin", json=self.state().to_json(),
            timeout=self.checkin_timeout)
        return answer

    async def download_model(self, version: int) -> NumpyParams:
        """The weights of ``version``, from the cache when the daemon answers 304 to ``If-None-Match``."""
        cached = self.cache.get(self.job, version)
        headers = {"If-None-Match": cached[0]} if cached else {}
        status, resp_headers, body = await self.request(
            "GET", f"/v1/jobs/{self.job}/models/{version}", headers=headers, ok=(200, 304))
        if status == 304 and cached is not None:
            self.stats.cache_hits += 1
            return cached[1]
        self.stats.downloads += 1
        tensors = decode_model(body)
        etag = resp_headers.get("ETag")
        if etag:
            self.cache.put(self.job, version, etag, tensors)
        return tensors

    async def upload_update(self, task_id: str, params: NumpyParams, *, samples: int, loss: float,
                            duration: float) -> dict[str, Any]:
        """``PUT .../tasks/{task_id}/update`` with the trained weights (idempotent by task id)."""
        body = encode_update(params, self.model_order, samples=samples, loss=loss, duration=duration)
        answer: dict[str, Any] = await self.request_json(
            "PUT", f"/v1/jobs/{self.job}/tasks/{task_id}/update", data=body,
            headers={"Content-Type": "application/octet-stream"})
        return answer

    async def abandon(self, task_id: str) -> None:
        """Give a task up (best effort: a daemon that is away lets it expire at its deadline instead)."""
        try:
            await self.request_json("POST", f"/v1/jobs/{self.job}/tasks/{task_id}/abandon")
            self.stats.abandoned += 1
        except (ProtocolError, ServerUnavailable) as exc:
            log.info("device %s: could not give task %s up: %s", self.device_id, task_id, exc)

    async def post_result(self, task_id: str, counts: train.TestCounts, duration: float) -> dict[str, Any]:
        """``POST .../tasks/{task_id}/result`` with test counts and sums."""
        answer: dict[str, Any] = await self.request_json(
            "POST", f"/v1/jobs/{self.job}/tasks/{task_id}/result",
            json={"samples": counts.samples, "correct_top1": counts.correct_top1,
                  "correct_top5": counts.correct_top5, "loss_sum": counts.loss_sum,
                  "duration": duration})
        return answer

    # ---- compute (off the event loop, so other devices keep talking) ------------------------------

    async def _compute(self, fn: Callable[[], Any]) -> Any:
        if self.compute is None:
            return await asyncio.to_thread(fn)
        async with self.compute:
            return await asyncio.to_thread(fn)

    def _model(self) -> ModelDef:
        if self.model_def is None:
            raise RuntimeError("model_info() has not been called")
        return self.model_def

    async def _weights(self, version: int) -> NumpyParams:
        params = await self.download_model(version)
        model = self._model()
        for name, shape in model.specs:
            if name not in params or tuple(params[name].shape) != tuple(shape):
                raise ProtocolError(422, errors.InvalidTensor.code,
                                    f"model {version} lacks or misshapes tensor {name}")
        return params

    async def _get(self, path: str) -> bytes:
        _, _, body = await self.request("GET", path)
        return body

    async def _engine(self, task: Mapping[str, Any]) -> tuple[Backend, NumpyParams]:
        """The backend a task asks for (its ``artifact``; JAX when absent) and the model's frozen tensors."""
        model = self._model()
        try:
            backend = await self.artifacts.backend(model, task.get("artifact") or {"backend": "jax"}, self._get)
            frozen = await self.artifacts.frozen(task.get("frozen"), self._get)
        except ArtifactMismatch as exc:
            raise ProtocolError(200, "artifact_mismatch", str(exc)) from None
        return backend, frozen

    # ---- tasks -------------------------------------------------------------------------------------

    async def do_train(self, task: dict[str, Any]) -> None:
        """Download the task's model version, train locally, upload (or vanish/sleep, by behaviour)."""
        task_id, version = str(task["task_id"]), int(task["model_version"])
        config = task.get("config", {})
        try:
            proxy_mu = task_proxy_mu(config)  # FedProx; 0 (plain FedAvg-style SGD) for older daemons
            params = await self._weights(version)
            backend, frozen = await self._engine(task)
            started = time.monotonic()
            seed = self.seed * 1_000_003 + self._tasks_done
            self._tasks_done += 1
            new, loss, samples = await self._compute(lambda: backend.train(
                frozen, params, self.data.x_train, self.data.y_train,
                lr=float(config.get("learning_rate", 0.05)), local_steps=int(config.get("local_steps", 20)),
                batch_size=int(config.get("batch_size", 32)), epochs=int(config.get("epochs", 0) or 0),
                weight_decay=float(config.get("weight_decay", 0.0) or 0.0), seed=seed,
                proxy_mu=proxy_mu))
        except (ProtocolError, ValueError, ArithmeticError):
            # This device cannot do the task: say so, so that the round does not wait for it until its deadline.
            await self.abandon(task_id)
            raise
        self.stats.trained += 1
        if self.rng.random() < self.behaviour.dropout:
            # A vanished phone: it holds the task and is gone until the task's deadline has passed,
            # so the daemon must close the round without it.
            self.stats.vanished += 1
            await self.sleep(float(task.get("deadline_in", 60.0)) + 1.0)
            return
        if self.behaviour.always_slow or self.rng.random() < self.behaviour.slow:
            await self.sleep(self.rng.uniform(*self.behaviour.slow_seconds))
        duration = time.monotonic() - started  # a slow phone's training took longer: it reports so
        if self.behaviour.hostile:
            # Model poisoning: large random weights, finite so that they pass validation, with a weight
            # claim as large as the device dares; robust aggregators must shrug it off.
            new = {name: self.np_rng.normal(0.0, HOSTILE_SCALE, size=value.shape).astype(value.dtype)
                   for name, value in new.items()}
            samples = max(samples, self.data.num_train)
            self.stats.poisoned += 1
        answer = await self.upload_update(task_id, new, samples=samples, loss=loss, duration=duration)
        self.stats.uploads_accepted += bool(answer.get("accepted"))
        self.stats.duplicates += bool(answer.get("duplicate"))

    async def do_test(self, task: dict[str, Any]) -> None:
        """Evaluate the task's model version on the local test shard and post the counts."""
        task_id, version = str(task["task_id"]), int(task["model_version"])
        if self.data.num_test == 0:
            # samples must be >= 1; a device without test data cannot answer (the daemon times it out).
            self.stats.count_error("no_test_data")
            return
        bsz = int(task.get("config", {}).get("test_bsz", 64) or 64)
        params = await self._weights(version)
        backend, frozen = await self._engine(task)
        started = time.monotonic()
        counts = await self._compute(
            lambda: backend.evaluate(frozen, params, self.data.x_test, self.data.y_test, batch_size=bsz))
        self.stats.tested += 1
        answer = await self.post_result(task_id, counts, time.monotonic() - started)
        self.stats.results_accepted += bool(answer.get("accepted"))
        self.stats.duplicates += bool(answer.get("duplicate"))

    # ---- the loop ----------------------------------------------------------------------------------

    async def run(self, max_iterations: int = 10_000) -> ClientStats:
        """The device loop of protocol.md until "done", the deadline, ``stop`` or ``max_iterations``.

        Never raises for protocol or network trouble: it counts errors, backs off and checks in again.
        """
        failures = 0
        for _ in range(max_iterations):
            if self.stop.is_set() or self._remaining() <= 0:
                break
            try:
                await self.ensure_enrolled()
                if self.model_def is None:
                    await self.model_info()
                answer = await self.checkin()
                action = answer.get("action")
                if action == "done":
                    self.stats.done_state = str(answer.get("reason") or answer.get("state", "finished"))
                    break
                if action == "wait":
                    self.stats.waits += 1
                    await self.sleep(self.retry_window_delay(answer.get("retry_after")))
                elif action == "train":
                    await self.do_train(answer["task"])
                elif action == "test":
                    await self.do_test(answer["task"])
                else:
                    raise ProtocolError(200, "unknown_action", f"unknown check-in answer {answer!r}")
                failures = 0
            except Stopped:
                break
            except ProtocolError as exc:
                self.stats.count_error(exc.code)
                if exc.code == errors.JobNotActive.code and self.token is not None and self.stats.done_state is None:
                    # The job ended while this device worked: the next check-in says how ("done").
                    self.stats.dropped_tasks += 1
                    continue
                if exc.code in JOB_OVER_CODES:
                    self.stats.done_state = exc.code
                    break
                if exc.code in DROP_TASK_CODES:
                    self.stats.dropped_tasks += 1
                    log.info("device %s: task dropped (%s)", self.device_id, exc.code)
                    continue
                if exc.code == errors.Unauthorized.code and self.enrollment_token is not None:
                    self.token = None  # Enroll again at the next iteration.
                log.warning("device %s: %s", self.device_id, exc)
                failures += 1
                if not await self._pause(failures):
                    break
            except (ServerUnavailable, KeyError, TypeError, ValueError) as exc:
                # ServerUnavailable: the daemon stayed away through every retry; keep the token and
                # check in again later. The others: a malformed answer.
                self.stats.count_error(type(exc).__name__)
                log.warning("device %s: %s", self.device_id, exc)
                failures += 1
                if not await self._pause(failures):
                    break
        return self.stats

    async def _pause(self, failures: int) -> bool:
        try:
            await self.sleep(self.backoff_delay(min(failures, 10)))
        except Stopped:
            return False
        return True

    async def fine_tune(self, *, lr: float, local_steps: int, batch_size: int, epochs: int = 0,
                        weight_decay: float = 0.0, x_test: np.ndarray | None = None,
                        y_test: np.ndarray | None = None) -> FineTuneResult:
        """Personalize: train the latest global model on local data without uploading anything.

        Returns the top-1 accuracy on local test data (``x_test``/``y_test``, by default the device's
        test shard) before and after training.
        """
        await self.ensure_enrolled()
        info = await self.model_info()
        version = int(info["latest_version"])
        params = await self._weights(version)
        served = info.get("backends") or {"jax": {"backend": "jax"}}
        choice = next((b for b in self.backends if b in served), None)
        if choice is None:
            raise ProtocolError(200, "unsupported_backend",
                                f"the job serves {', '.join(served)}; this device runs {', '.join(self.backends)}")
        backend, frozen = await self._engine({"artifact": served[choice], "frozen": info.get("frozen")})
        if isinstance(backend, ArtifactBackend):
            batch_size = backend.train_batch  # the artifact's graph fixes it
        xt = self.data.x_test if x_test is None else x_test
        yt = self.data.y_test if y_test is None else y_test

        def work() -> FineTuneResult:
            before = backend.evaluate(frozen, params, xt, yt, batch_size)
            new, loss, samples = backend.train(
                frozen, params, self.data.x_train, self.data.y_train, lr=lr, local_steps=local_steps,
                batch_size=batch_size, epochs=epochs, weight_decay=weight_decay, seed=self.seed)
            after = backend.evaluate(frozen, new, xt, yt, batch_size)
            return FineTuneResult(version, before.accuracy, after.accuracy, samples, loss, backend.name)

        result: FineTuneResult = await self._compute(work)
        return result


def task_proxy_mu(config: Mapping[str, Any]) -> float:
    """FedProx's ``mu`` of a train task's config: ``proxy_mu``, 0 when absent or null (older daemons).

    A negative or non-finite value is refused (ValueError): it would push the weights away from the
    global model instead of pulling them toward it.
    """
    mu = float(config.get("proxy_mu") or 0.0)
    if not math.isfinite(mu) or mu < 0.0:
        raise ValueError(f"proxy_mu must be a finite number >= 0, got {config.get('proxy_mu')!r}")
    return mu


def _retry_after_header(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds form), or None."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _protocol_error(status: int, body: bytes) -> ProtocolError:
    """The :class:`ProtocolError` of an error answer (``{"error": {"code", "message", "details"}}``)."""
    try:
        err = jsonlib.loads(body)["error"]
        return ProtocolError(status, str(err["code"]), str(err.get("message", "")), err.get("details"))
    except (ValueError, KeyError, TypeError):
        return ProtocolError(status, f"http_{status}", body[:200].decode("utf-8", "replace"))
