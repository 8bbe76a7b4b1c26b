"""The job registry: submit, stop, status and logs of jobs kept in the store.

Job records live in the ``jobs`` database as JSON; every state change is committed together with
the log event that describes it. The round engine (:mod:`fedscaled.daemon.runner`) drives running jobs
through this registry.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, NotRequired, TypedDict, cast

from fedscaled.core.config import JobConfig, parse_job_text
from fedscaled.errors import JobExists, JobNotActive, JobNotFound
from fedscaled.jobs.joblog import JobLog
from fedscaled.store import layout
from fedscaled.store.layout import JOB_SCOPED_DBS
from fedscaled.store.lmdb_store import Store, WriteBatch

ACTIVE_STATES = ("pending", "running")
ENDED_STATES = ("finished", "stopped", "failed")

__all__ = ["ACTIVE_STATES", "ENDED_STATES", "JOB_RECORD_KEYS", "JOB_SCOPED_DBS", "JobRecord", "JobRegistry",
           "caller_text", "status_view"]


class JobRecord(TypedDict):
    """A job's record in the ``jobs`` database (JSON). Nested values are shared between copies: replace
    them, never mutate them."""

    name: str
    state: str  # one of ACTIVE_STATES or ENDED_STATES
    mode: str
    created_at: float
    updated_at: float
    ended_at: float | None
    round: int  # the round of the open or last phase (0 before the first)
    rounds: int  # the job's configured number of rounds
    model_version: int  # the newest model version
    round_attempt: int  # retries of the current round below quorum
    completed_rounds: int
    tested_version: int | None  # the model version last tested
    phase: dict[str, Any] | None  # the open phase (rounds.Phase.to_record()), None between phases
    phase_seq: int  # the id of the last phase opened
    initial_test: dict[str, Any] | None  # the test of model version 0, if the job tests it
    metrics: list[dict[str, Any]]  # one entry per round
    reason: str  # why the job ended
    enrollment_token: str
    source: str  # where the job file came from
    config: dict[str, Any]  # JobConfig.to_record()
    oort: NotRequired[dict[str, Any]]  # Oort's selection state (sample_mode oort)
    strategy: NotRequired[dict[str, Any]]  # the aggregation strategy's small state
    privacy: NotRequired[dict[str, Any]]  # differential-privacy accounting


JOB_RECORD_KEYS = frozenset(JobRecord.__annotations__)


def caller_text(caller: Mapping[str, Any] | None) -> str:
    """Who asked, from the control socket's peer credentials: ``uid 1000, pid 4242``."""
    if not caller or "uid" not in caller:
        return "an unknown caller"
    return f"uid {caller['uid']}, pid {caller.get('pid', '?')}"


class JobRegistry:
    """Jobs in the store, with their logs. All methods run on the event loop thread."""

    def __init__(self, store: Store, log: JobLog) -> None:
        self.store = store
        self.log = log
        # Called with (config, batch) at submit so the round engine can add the initial model.
        self.on_submit: Callable[[JobConfig, WriteBatch], None] | None = None
        # Called with (name, record) after a committed change of a job's state (submitted, ended).
        self.on_state_change: list[Callable[[str, JobRecord], None]] = []
        # The newest version of every job record, updated synchronously before its commit is awaited, so
        # that two read-modify-write updates interleaved at an await never lose each other's changes.
        self._records: dict[str, JobRecord] = {}

    # ----- reads
    def _stored(self, name: str) -> JobRecord | None:
        """The newest record of ``name``: the one in memory, else the stored one (not copied)."""
        record = self._records.get(name)
        if record is None:
            stored: JobRecord | None = self.store.get_json(layout.JOBS_DB, layout.job_key(name))
            return stored
        return record

    def get(self, name: str) -> JobRecord:
        """A copy of the job record, or JobNotFound. Nested values are shared: replace, never mutate them."""
        record = self._stored(name)
        if record is None:
            raise JobNotFound(f"no job named {name!r}", job=name)
        self._records[name] = record
        return record.copy()

    def state(self, name: str) -> str:
        """The job's state (``pending``, ``running``, ``finished`` …), or JobNotFound; no copy of the record
        (every check-in and upload asks)."""
        record = self._stored(name)
        if record is None:
            raise JobNotFound(f"no job named {name!r}", job=name)
        self._records[name] = record
        return record["state"]

    def all(self) -> list[JobRecord]:
        """Every job record, by name."""
        return [self.get(layout.job_name(k)) for k in self.store.scan_keys(layout.JOBS_DB, layout.JOBS_PREFIX)]

    def config(self, name: str) -> JobConfig:
        """The job's validated config."""
        return JobConfig.from_record(self.get(name)["config"])

    # ----- changes
    async def submit(self, text: str, *, replace: bool = False, source: str = "",
                     caller: Mapping[str, Any] | None = None) -> JobRecord:
        """Validate a job file and store the job as ``pending``. Raises InvalidConfig, JobExists.

        ``caller`` (the operator's uid and pid) is named in the job's log.
        """
        config = parse_job_text(text)
        existing = self._stored(config.name)
        batch = WriteBatch()
        if existing is not None:
            if existing["state"] in ACTIVE_STATES:
                raise JobExists(f"job {config.name!r} exists and is {existing['state']}; stop it first",
                                job=config.name)
            if not replace:
                raise JobExists(f"job {config.name!r} exists ({existing['state']}); use --replace to submit "
                                f"it again", job=config.name)
            layout.wipe_job(batch, config.name)
            self._delete_tokens(batch, config.name)
            self.log.forget(config.name)
        now = time.time()
        record: JobRecord = {
            "name": config.name,
            "state": "pending",
            "mode": config.mode,
            "created_at": now,
            "updated_at": now,
            "ended_at": None,
            "round": 0,
            "rounds": config["rounds"],
            "model_version": 0,
            "round_attempt": 0,
            "completed_rounds": 0,
            "tested_version": None,
            "phase": None,
            "phase_seq": 0,
            "initial_test": None,
            "metrics": [],
            "reason": "",
            "enrollment_token": config["enrollment_token"],
            "source": source,
            "config": config.to_record(),
        }
        batch.put_json(layout.JOBS_DB, layout.job_key(config.name), record)
        where = f" from {source}" if source else ""
        where += f" by {caller_text(caller)}" if caller is not None else ""
        self.log.add(batch, config.name, f"Job {config.name} submitted{where}: model {config['model']}, "
                     f"{config['rounds']} rounds, {config['num_participants']} participants per round, "
                     f"mode {config.mode}", **(caller or {}))
        if config.ignored:
            self.log.add(batch, config.name, "Ignored keys (FedScale launcher or simulator settings): "
                         + ", ".join(config.ignored), level="WARNING")
        try:
            # The engine adds the initial model (and may refuse the job): nothing is kept in memory or
            # in the store until the whole batch commits.
            if self.on_submit is not None:
                self.on_submit(config, batch)
            self._records[config.name] = record
            await self.store.commit(batch)
        except BaseException:
            if existing is None:
                self._records.pop(config.name, None)
            else:
                self._records[config.name] = existing
            self.log.forget(config.name)
            raise
        self.log.notify(config.name)
        self._changed(config.name, record)
        return record

    def _delete_tokens(self, batch: WriteBatch, name: str) -> None:
        for _, raw in self.store.scan(layout.DEVICES_DB, layout.devices_prefix(name)):
            device = json.loads(raw)
            batch.delete(layout.TOKENS_DB, layout.token_key(bytes.fromhex(device["token_hash"])))

    async def update(self, name: str, changes: Mapping[str, Any], message: str | None = None,
                     level: str = "INFO", batch: WriteBatch | None = None,
                     event_fields: Mapping[str, Any] | None = None) -> JobRecord:
        """Apply ``changes`` (keys of :class:`JobRecord`) to the job record (and log ``message``) in one
        durable commit."""
        unknown = set(changes) - JOB_RECORD_KEYS
        if unknown:
            raise ValueError(f"not keys of a job record: {', '.join(sorted(unknown))}")
        current = self.get(name)
        # A TypedDict takes no Mapping[str, Any] update: merge as plain dicts, the keys are checked above.
        record = cast(JobRecord, {**current, **changes, "updated_at": time.time()})
        batch = batch if batch is not None else WriteBatch()
        batch.put_json(layout.JOBS_DB, layout.job_key(name), record)
        self._records[name] = record
        if message is not None:
            self.log.add(batch, name, message, level, **(event_fields or {}))
        await self.store.commit(batch)
        self.log.notify(name)
        return record

    async def end(self, name: str, state: str, reason: str, level: str = "INFO",
                  event_fields: Mapping[str, Any] | None = None) -> JobRecord:
        """Move an active job to an ended state."""
        record = self.get(name)
        if record["state"] not in ACTIVE_STATES:
            raise JobNotActive(f"job {name!r} is already {record['state']}", job=name, state=record["state"])
        # An ended job never resumes its round: drop the round's stored updates and running sum.
        batch = layout.drop_round_state(WriteBatch(), name)
        record = await self.update(name, {"state": state, "reason": reason, "ended_at": time.time(), "phase": None},
                                   f"Job {name} {state}: {reason}", level=level, batch=batch,
                                   event_fields={"state": state, **(event_fields or {})})
        self._changed(name, record)
        return record

    def _changed(self, name: str, record: JobRecord) -> None:
        for listener in self.on_state_change:
            listener(name, record)

    async def stop(self, name: str, caller: Mapping[str, Any] | None = None) -> JobRecord:
        """Stop an active job (operator request; ``caller`` is named in the job's log)."""
        by = f" ({caller_text(caller)})" if caller is not None else ""
        return await self.end(name, "stopped", f"stopped by the operator{by}", event_fields=caller)

    async def rotate_token(self, name: str, caller: Mapping[str, Any] | None = None) -> JobRecord:
        """Give the job a new random enrollment token: the old one enrolls no more devices, devices already
        enrolled keep their own tokens. Durable and logged (without the token) in one commit."""
        record = self.get(name)
        token = secrets.token_hex(20)  # as generated at submit
        # The token also sits in the stored config values (status --json shows them): keep both the same.
        config = {**record["config"], "values": {**record["config"]["values"], "enrollment_token": token}}
        return await self.update(name, {"enrollment_token": token, "config": config},
                                 f"Enrollment token rotated by {caller_text(caller)}: the old token enrolls no "
                                 f"more devices", level="WARNING", event_fields=dict(caller or {}))

    def events(self, name: str, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """The job's log events after ``since``."""
        self.get(name)
        return self.log.read(name, since, limit)

    def enrolled_devices(self, name: str) -> int:
        """How many devices enrolled in the job."""
        return self.store.count(layout.DEVICES_DB, layout.devices_prefix(name))


def status_view(record: JobRecord) -> dict[str, Any]:
    """The public view of a job record (``fedscalectl status JOB --json``)."""
    config = record["config"]["values"]
    return {
        "name": record["name"],
        "state": record["state"],
        "mode": record["mode"],
        "round": record["round"],
        "rounds": record["rounds"],
        "model_version": record["model_version"],
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
        "ended_at": record["ended_at"],
        "reason": record["reason"],
        "model": config["model"],
        "input_shape": config["input_shape"],
        "num_classes": config["num_classes"],
        "num_participants": config["num_participants"],
        "enrollment_token": record["enrollment_token"],
        "ignored_keys": record["config"]["ignored"],
        "completed_rounds": record["completed_rounds"],
        "phase": record["phase"],
        "initial_test": record["initial_test"],
        "oort": record.get("oort"),  # Oort's selection state (sample_mode oort): exploration, pacer, blacklist
        # Central differential privacy spent so far (noise_multiplier > 0): epsilon at delta, noised rounds.
        "privacy": record.get("privacy"),
        "strategy": config["gradient_policy"],
        "metrics": record["metrics"],
        "config": config,
    }
