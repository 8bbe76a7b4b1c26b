"""The engine: every active job's runner, plus enrollment and the device-facing operations.

The device API (:mod:`fedscaled.server`) calls only this class; it finds the job's runner, checks the
device's token, and keeps jobs independent: one job's failure ends only that job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fedscaled.artifacts import PREBUILT_DIR
from fedscaled.core import artifact_spec
from fedscaled.core.config import JobConfig
from fedscaled.core.models import ModelDef
from fedscaled.core.rounds import DeviceStatus, Task
from fedscaled.errors import (
    DeviceRevoked,
    FedError,
    JobFull,
    JobNotActive,
    JobNotFound,
    NoArtifact,
    Overloaded,
    UnknownModelVersion,
)
from fedscaled.jobs.artifacts import Artifact, ArtifactCatalog
from fedscaled.jobs.async_runner import AsyncRunner
from fedscaled.jobs.devices import DeviceDirectory
from fedscaled.jobs.enroll_gate import EnrollGate, EnrollLimits
from fedscaled.jobs.initial_model import DEFAULT_MAX_MODEL_PARAMS, initial_model, model_of
from fedscaled.jobs.registry import ACTIVE_STATES, JobRecord, JobRegistry, caller_text
from fedscaled.jobs.runner import JobRunner, TaskBusy, accepted_answer
from fedscaled.metrics import Metrics
from fedscaled.store import layout
from fedscaled.store.lmdb_store import WriteBatch

log = logging.getLogger("fedscaled.engine")

# A job's driver: synchronous rounds or asynchronous (FedBuff) aggregation; the engine treats both alike.
Runner = JobRunner | AsyncRunner

# How long a re-sent result waits for its first upload, still arriving, before 503 (a slow phone's upload).
BUSY_WAIT_SECONDS = 60.0

# Room in an upload body beyond the tensor bytes: the safetensors header (names, shapes, offsets) and
# metadata. Generous for any zoo model, small enough to refuse junk early.
HEADER_ALLOWANCE = 64 * 1024


class Engine:
    """Runs the active jobs of a registry and serves the device operations."""

    def __init__(self, registry: JobRegistry, *, max_pending_checkins: int = 20000,
                 metrics: Metrics | None = None, artifacts: ArtifactCatalog | None = None,
                 max_model_params: int = DEFAULT_MAX_MODEL_PARAMS, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock  # the round rules' wall clock, handed to every runner (tests move it)
        self.max_model_params = max_model_params
        self.artifacts = artifacts if artifacts is not None else ArtifactCatalog([PREBUILT_DIR])
        self.store = registry.store
        self.devices = DeviceDirectory(self.store)
        self.enroll_gate = EnrollGate()
        self.metrics = metrics or Metrics()
        self.runners: dict[str, Runner] = {}
        self.shutting_down = False
        self._pool_budget = [max_pending_checkins]
        self._retiring: set[asyncio.Task[None]] = set()
        self._frozen_digest: dict[str, str] = {}
        self._artifact_keys: dict[str, artifact_spec.ArtifactKey] = {}
        self._served: dict[str, list[str]] = {}
        self._checkin_counters: dict[tuple[str, str], Any] = {}
        registry.on_submit = self._add_initial_model
        registry.on_state_change.append(self._state_changed)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resume every active job from the store."""
        for record in self.registry.all():
            if record["state"] in ACTIVE_STATES:
                self._start_runner(record["name"])

    def _start_runner(self, name: str) -> None:
        # Synchronous rounds, or FedBuff's buffered asynchronous aggregation (aggregator_entry: ...async...).
        kind = AsyncRunner if self.registry.get(name)["mode"] == "async" else JobRunner
        runner = kind(self.registry, name, self.metrics, self._pool_budget, clock=self.clock)
        self.runners[name] = runner
        runner.start()

    def begin_shutdown(self) -> None:
        """Stop handing out work; answer held check-ins with 'come back soon'."""
        self.shutting_down = True
        for runner in self.runners.values():
            runner.shutting_down = True
            runner.release_waiters({"min": 1.0, "max": 5.0}, "shutting_down")

    async def stop(self) -> None:
        """Stop every job's loop (their state stays in the store)."""
        await asyncio.gather(*(runner.cancel() for runner in self.runners.values()), *self._retiring)
        self.runners.clear()

    def _add_initial_model(self, config: JobConfig, batch: WriteBatch) -> None:
        initial = initial_model(config, self.store, self.max_model_params)
        batch.put(layout.MODELS_DB, layout.model_key(config.name, 0), initial.model_bytes)
        if initial.frozen_bytes is not None:
            batch.put(layout.MODELS_DB, layout.frozen_key(config.name), initial.frozen_bytes)
        for note in initial.notes:
            self.registry.log.add(batch, config.name, note)
        artifact_key = artifact_spec.key_of(config)
        self.artifacts.forget(artifact_key)  # look again: the operator may have added a build since
        found = self.artifacts.for_key(artifact_key)
        served = ", ".join(f"{b} ({a.total_bytes} bytes, {a.sha256[:12]})" for b, a in found.items())
        missing = [b for b in artifact_spec.BACKENDS if b not in found]
        native = ", ".join(artifact_spec.native_backends(str(config["model"])))
        self.registry.log.add(batch, config.name, f"Backends served: {native}{', ' + served if served else ''}")
        if missing:
            self.registry.log.add(
                batch, config.name,
                f"No {'/'.join(missing)} artifact for {artifact_key.slug()}: devices that run only "
                f"{' or '.join(missing)} are told the job is not for them. Build one with "
                f"`scripts/build-artifacts.sh JOBFILE --out ARTIFACT_DIR` (docs/mobile.md)", level="WARNING")

    def _state_changed(self, name: str, record: JobRecord) -> None:
        runner = self.runners.get(name)
        self.enroll_gate.forget(name)
        if record["state"] in ACTIVE_STATES:
            if runner is not None:  # replaced job: drop the old runner's state
                self._retire(runner)
            self.devices.forget_job(name)
            self._frozen_digest.pop(name, None)
            self._artifact_keys.pop(name, None)
            self._served.pop(name, None)
            if not self.shutting_down:
                self._start_runner(name)
        elif runner is not None:
            runner.ended(record["state"])
            self.runners.pop(name, None)
            self._retire(runner)

    def _retire(self, runner: Runner) -> None:
        """Cancel a runner that no longer drives its job; :meth:`stop` waits for it."""
        retiring = asyncio.get_running_loop().create_task(runner.cancel())
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------------ lookups
    def job_exists(self, job: str) -> bool:
        """Whether a job of this name is in the store."""
        try:
            self.registry.get(job)
        except JobNotFound:
            return False
        return True

    def model_def(self, job: str) -> ModelDef:
        """The zoo model of a job."""
        runner = self.runners.get(job)
        return runner.model if runner is not None else model_of(self.registry.config(job))

    def live_view(self, job: str) -> dict[str, Any] | None:
        """The running job's pool and phase right now (None when it does not run)."""
        runner = self.runners.get(job)
        return runner.live_view() if runner is not None else None

    def job_artifacts(self, job: str) -> dict[str, Artifact]:
        """The artifacts a job serves, by backend."""
        artifact_key = self._artifact_keys.get(job)
        if artifact_key is None:  # parsed once per job, not at every check-in
            runner = self.runners.get(job)
            config = runner.config if runner is not None else self.registry.config(job)
            artifact_key = self._artifact_keys[job] = artifact_spec.key_of(config)
        return self.artifacts.for_key(artifact_key)

    def artifact(self, job: str, backend: str) -> Artifact:
        """One backend's artifact of a job. Raises NoArtifact."""
        found = self.job_artifacts(job).get(backend)
        if found is None:
            raise NoArtifact(f"job {job} serves no {backend!r} artifact; it serves "
                             f"{', '.join(self.served_backends(job))}", backend=backend[:32])
        return found

    def served_backends(self, job: str) -> list[str]:
        """Backends a device can train this job with: the artifact-free ones, then those with artifacts.
        Worked out once per job (every check-in asks), forgotten when the job is submitted again."""
        served = self._served.get(job)
        if served is None:
            served = self._served[job] = [*artifact_spec.native_backends(self.model_def(job).name),
                                          *self.job_artifacts(job)]
        return list(served)

    def frozen_bytes(self, job: str) -> bytes:
        """The job's frozen tensors as safetensors. Raises NoArtifact for a model without any."""
        self.registry.get(job)
        data = self.store.get(layout.MODELS_DB, layout.frozen_key(job))
        if data is None:
            raise NoArtifact(f"the model of job {job} has no frozen tensors")
        return data

    def _backend_for(self, job: str, status: DeviceStatus) -> str | None:
        served = self.served_backends(job)
        return next((b for b in status.backends if b in served), None)

    def _describe_backend(self, job: str, backend: str) -> dict[str, Any]:
        if backend in artifact_spec.NATIVE_BACKENDS:
            return {"backend": backend}
        artifact = self.artifact(job, backend)
        return {"backend": backend, "manifest": f"/v1/jobs/{job}/artifacts/{backend}", "sha256": artifact.sha256}

    def frozen_ref(self, job: str) -> dict[str, Any] | None:
        """Where a device gets the job's frozen tensors, and their SHA-256 (None: the model has none)."""
        model = self.model_def(job)
        if not model.frozen_specs:
            return None
        digest = self._frozen_digest.get(job)
        if digest is None:
            digest = self._frozen_digest[job] = hashlib.sha256(self.frozen_bytes(job)).hexdigest()
        return {"url": f"/v1/jobs/{job}/frozen", "sha256": digest}

    def max_upload_bytes(self, job: str) -> int:
        """Largest accepted upload body for the job's model."""
        return self.model_def(job).num_params * 4 + HEADER_ALLOWANCE

    # ------------------------------------------------------------------ device operations
    async def enroll(self, job: str, enrollment_token: Any, device_info: Any, address: str = "") -> dict[str, Any]:
        """Enroll a device in an active job, within the job's rate limits and ``max_devices``.

        Checks in order: the address's bucket, the token and body, the job token's bucket, the cap; only an
        enrollment that passes them all spends from both buckets (a wrong token spends the address's).
        """
        record = self.registry.get(job)
        if record["state"] not in ACTIVE_STATES:
            raise JobNotActive(f"job {job} is {record['state']}; it takes no new devices", job=job,
                               state=record["state"])
        runner = self.runners.get(job)
        limits = EnrollLimits.of(runner.config if runner is not None else self.registry.config(job))
        gate = self.enroll_gate
        now = time.monotonic()
        gate.check_address(job, limits, address, now)
        try:
            batch, device_id, token = self.devices.enroll_batch(job, record["enrollment_token"], enrollment_token,
                                                                device_info)
        except FedError:
            gate.spend_address(job, limits, address, now)
            raise
        gate.check_token(job, limits, now)
        if limits.max_devices > 0:
            enrolled = self.devices.active_count(job) + gate.pending.get(job, 0)
            if enrolled >= limits.max_devices:
                raise JobFull(f"job {job} has its max_devices of {limits.max_devices} devices; it takes no "
                              f"more until the operator revokes some or raises the limit",
                              max_devices=limits.max_devices, job=job)
        gate.spend_address(job, limits, address, now)
        gate.spend_token(job, limits, now)
        gate.pending[job] = gate.pending.get(job, 0) + 1
        try:
            await self.store.commit(batch)
        finally:
            gate.pending[job] -= 1
            if not gate.pending[job]:
                del gate.pending[job]
        self.devices.committed(batch)
        return {"device_id": device_id, "token": token, "job": job}

    def authenticate(self, job: str, authorization: str | None) -> str:
        """The device id of a bearer token of ``job``; 403 ``device_revoked`` for a revoked device."""
        self.registry.state(job)  # unknown job: 404 before 401
        return self.devices.authenticate(job, authorization)

    # ------------------------------------------------------------------ operator actions on devices
    async def revoke(self, job: str, device_id: str, caller: dict[str, Any]) -> dict[str, Any]:
        """Revoke a device durably: its token answers 403 from now on and it leaves the selection pool."""
        self.registry.get(job)
        batch = self.devices.revoke_batch(job, device_id, caller)
        if batch is None:
            return {"job": job, "device_id": device_id, "revoked": True, "already_revoked": True}
        self.registry.log.add(batch, job, f"Device {device_id} revoked by {caller_text(caller)}", level="WARNING",
                              device_id=device_id, **caller)
        await self.store.commit(batch)
        self.registry.log.notify(job)
        self.devices.revoked(job, device_id)
        runner = self.runners.get(job)
        if runner is not None:
            runner.drop_device(device_id, DeviceRevoked(f"device {device_id} was revoked by the operator of job "
                                                        f"{job}", job=job, device_id=device_id))
        log.info("job %s: device %s revoked by %s", job, device_id, caller_text(caller))
        return {"job": job, "device_id": device_id, "revoked": True, "already_revoked": False}

    def device_list(self, job: str) -> list[dict[str, Any]]:
        """Every device of ``job``: id, enrolled at, last seen (this daemon run), tasks done, state."""
        self.registry.get(job)
        done: dict[str, int] = {}
        for _, raw in self.store.scan(layout.TASKS_DB, layout.tasks_prefix(job)):
            task = json.loads(raw)
            if task.get("done"):
                done[task["device_id"]] = done.get(task["device_id"], 0) + 1
        devices = []
        for record in self.devices.records(job):
            device_id = record["device_id"]
            devices.append({"device_id": device_id, "enrolled_at": record["enrolled_at"],
                            "last_seen": self.devices.last_seen.get((job, device_id)),
                            "tasks_done": done.get(device_id, 0),
                            "state": "revoked" if record.get("revoked_at") is not None else "active",
                            "revoked_at": record.get("revoked_at")})
        devices.sort(key=lambda d: (d["enrolled_at"], d["device_id"]))
        return devices

    async def checkin(self, job: str, device_id: str, status: DeviceStatus) -> dict[str, Any]:
        """A device's check-in; ended jobs answer 'done'."""
        # Revoked while its body was being read: it must not enter the selection pool.
        self.devices.check_active(job, device_id)
        runner = self.runners.get(job)
        backend = self._backend_for(job, status)
        answer: dict[str, Any]
        if runner is None:
            record = self.registry.get(job)
            answer = {"action": "done", "state": record["state"]}
        elif backend is None:
            # Nothing this device can run: tell it so instead of handing it a task it cannot do.
            answer = {"action": "done", "reason": "unsupported_backend", "state": self.registry.get(job)["state"],
                      "backends": self.served_backends(job)}
        else:
            answer = await runner.checkin(device_id, status)
            if "task" in answer:
                answer = {**answer, "task": {**answer["task"], "artifact": self._describe_backend(job, backend)}}
                frozen = self.frozen_ref(job)
                if frozen is not None:
                    answer["task"]["frozen"] = frozen
        counter = self._checkin_counters.get((job, answer["action"]))
        if counter is None:  # a label lookup takes a lock and builds a key: once per (job, action)
            counter = self._checkin_counters[(job, answer["action"])] = self.metrics.checkins.labels(
                job, answer["action"])
        counter.inc()
        return answer

    def model_info(self, job: str) -> dict[str, Any]:
        """The job's model description for devices."""
        record = self.registry.get(job)
        model = self.model_def(job)
        info = {"job": job, "model": model.name, "input_shape": list(model.input_shape),
                "num_classes": model.num_classes, "width_multiplier": model.width_multiplier,
                "checkin_wait": float(self.registry.config(job)["checkin_wait"]),
                "latest_version": record["model_version"], "num_params": model.num_params, "state": record["state"],
                "tensors": [{"name": n, "shape": list(s), "dtype": "F32"} for n, s in model.specs],
                "frozen_tensors": [{"name": n, "shape": list(s), "dtype": "F32"} for n, s in model.frozen_specs],
                "backends": {b: self._describe_backend(job, b) for b in self.served_backends(job)}}
        frozen = self.frozen_ref(job)
        if frozen is not None:
            info["frozen"] = frozen
        return info

    def model_bytes(self, job: str, version: int) -> bytes:
        """Weights of a model version as safetensors."""
        runner = self.runners.get(job)
        data = (runner.model_bytes(version) if runner is not None
                else self.store.get(layout.MODELS_DB, layout.model_key(job, version)))
        if data is None:
            self.registry.get(job)
            raise UnknownModelVersion(f"job {job} has no model version {version}", version=version)
        return data

    def _reserve(self, job: str, device_id: str, task_id: str, kind: str
                 ) -> tuple[Runner | None, Task, dict[str, Any] | None]:
        """Check a result may be accepted for ``task_id`` now; see :meth:`JobRunner.reserve`."""
        runner = self.runners.get(job)
        if runner is None:
            # Ended job: a re-sent result still gets its earlier answer.
            record = self.registry.get(job)
            raw = self.store.get_json(layout.TASKS_DB, layout.task_key(job, task_id))
            if raw is not None and raw["device_id"] == device_id and raw["done"]:
                task = Task.from_record(raw)
                return None, task, accepted_answer(task, duplicate=True)
            raise JobNotActive(f"job {job} is {record['state']}", job=job, state=record["state"])
        task, duplicate = runner.reserve(device_id, task_id, kind)
        return runner, task, duplicate

    async def abandon(self, job: str, device_id: str, task_id: str) -> dict[str, Any]:
        """A device gives its task up (it cannot finish it): the round or the async job stops counting on it."""
        runner = self.runners.get(job)
        if runner is None:
            record = self.registry.get(job)
            raise JobNotActive(f"job {job} is {record['state']}", job=job, state=record["state"])
        return await runner.abandon(device_id, task_id)

    @contextlib.asynccontextmanager
    async def result_slot(self, job: str, device_id: str, task_id: str, kind: str) -> AsyncIterator[ResultSlot]:
        """Hold the right to deliver ``task_id``'s result while its body arrives; released on exit.

        A result this task already delivered gets its earlier answer (``slot.duplicate``), and a re-send
        racing its own first upload waits for it, bounded, then answers the same way (invariant 2: the same
        answer, never counted twice). Raises the refusal (wrong round, expired, unknown task...) otherwise.
        """
        reserved: tuple[Runner | None, Task, dict[str, Any] | None] | None = None
        for _ in range(3):
            try:
                reserved = self._reserve(job, device_id, task_id, kind)
                break
            except TaskBusy as busy:
                try:
                    await asyncio.wait_for(asyncio.shield(busy.done), BUSY_WAIT_SECONDS)
                except TimeoutError:
                    break
        if reserved is None:
            raise Overloaded("an upload for this task is still being received; retry later", retry_after=5)
        runner, task, duplicate = reserved
        slot = ResultSlot(self, job, device_id, runner, task, duplicate)
        try:
            yield slot
        finally:
            if runner is not None and duplicate is None:
                runner.release(task_id)


class ResultSlot:
    """One task's reserved result delivery (see :meth:`Engine.result_slot`)."""

    def __init__(self, engine: Engine, job: str, device_id: str, runner: Runner | None, task: Task,
                 duplicate: dict[str, Any] | None) -> None:
        self._engine = engine
        self._job = job
        self._device_id = device_id
        self._runner = runner
        self.task = task
        self.duplicate = duplicate

    async def accept_update(self, body: memoryview) -> dict[str, Any]:
        """Validate a training upload and make it durable (not counted if the device was revoked meanwhile)."""
        assert self._runner is not None and self.duplicate is None
        self._engine.devices.check_active(self._job, self._device_id)
        return await self._runner.accept_update(self.task, body)

    async def accept_result(self, body: Any) -> dict[str, Any]:
        """Validate and persist a test task's result counts."""
        assert self._runner is not None and self.duplicate is None
        return await self._runner.accept_result(self.task, body)
