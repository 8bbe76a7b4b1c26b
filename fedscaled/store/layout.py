"""The store's layout: which database holds what, under which key. The one place keys are spelled.

Named LMDB databases; keys are bytes built by :func:`fedscaled.store.lmdb_store.key` (strings joined
by NUL, integers as big-endian u64 so that LMDB's byte order is numeric order):

=========  ======================================  =========================================
database   key                                     value
=========  ======================================  =========================================
meta       ``schema_version``                      ``b"1"``
jobs       job name                                job record (JSON)
events     job ``\\0`` seq (u64 BE)                  event record (JSON)
models     job ``\\0`` version (u64 BE)              model weights (safetensors bytes)
models     job ``\\0`` ``frozen``                    the model's frozen tensors (safetensors bytes)
devices    job ``\\0`` device id                     device record (JSON; token stored hashed)
tokens     token hash (SHA-256)                    job ``\\0`` device id
tasks      job ``\\0`` task id                       task record (JSON)
updates    job ``\\0`` phase (u64 BE) task id        accepted update (robust aggregators): raw float32
sums       job ``\\0`` phase (u64 BE) ``acc``        FedAvg running sum of the open phase: raw float32
sums       job ``\\0`` phase (u64 BE) ``meta``       its weight, loss sums and accepted count (JSON)
strategy   job ``\\0`` name                          round-engine state: server optimizer, async buffers
=========  ======================================  =========================================

Every database but ``meta``, ``jobs`` and ``tokens`` is job-scoped (:data:`JOB_SCOPED_DBS`): its keys
start with :func:`job_prefix`, ``job \\0``, so that a prefix scan of job ``a`` never sees job ``ab``, and
replacing a job deletes them all (the ``tokens`` of its devices are deleted one by one from the device
records). Note that no NUL follows an integer part: ``updates`` keys are ``job \\0 u64(phase) task_id``.

Keys are a stored format: a daemon upgraded in place reads its old store, so never change how an
existing key is built (tests/test_store_layout.py pins their bytes).
"""

from __future__ import annotations

from typing import Final

from fedscaled.store.lmdb_store import SEP, WriteBatch, key

# ----- database names (fedscaled.store.lmdb_store.DATABASES opens exactly these)
META_DB: Final = "meta"
JOBS_DB: Final = "jobs"
EVENTS_DB: Final = "events"
MODELS_DB: Final = "models"
DEVICES_DB: Final = "devices"
TOKENS_DB: Final = "tokens"
TASKS_DB: Final = "tasks"
UPDATES_DB: Final = "updates"
SUMS_DB: Final = "sums"
STRATEGY_DB: Final = "strategy"

# Databases whose keys start with ``job \0``: wiped when a job is replaced.
JOB_SCOPED_DBS: Final = (EVENTS_DB, MODELS_DB, DEVICES_DB, TASKS_DB, UPDATES_DB, SUMS_DB, STRATEGY_DB)

SCHEMA_VERSION_KEY: Final = b"schema_version"  # in META_DB (written by the Store itself)
FROZEN: Final = "frozen"  # the name of a job's frozen tensors in MODELS_DB, in place of a version


# ----- any job-scoped database
def job_prefix(job: str) -> bytes:
    """``job \\0``: the prefix of every key of ``job`` in a job-scoped database."""
    return key(job) + SEP


# ----- jobs
def job_key(name: str) -> bytes:
    """JOBS_DB: the key of a job's record (its name)."""
    return key(name)


JOBS_PREFIX: Final = b""  # JOBS_DB: a scan from here lists every job


def job_name(k: bytes) -> str:
    """The job name of a JOBS_DB key."""
    return k.decode()


# ----- events
def event_key(job: str, seq: int) -> bytes:
    """EVENTS_DB: the key of event ``seq`` (1-based) of ``job``."""
    return key(job, seq)


def events_prefix(job: str) -> bytes:
    """EVENTS_DB: the prefix of every event of ``job`` (they sort by seq)."""
    return job_prefix(job)


def event_seq(k: bytes) -> int:
    """The seq of an EVENTS_DB key."""
    return int.from_bytes(k[-8:], "big")


# ----- models
def model_key(job: str, version: int) -> bytes:
    """MODELS_DB: the key of model ``version`` of ``job``."""
    return key(job, version)


def frozen_key(job: str) -> bytes:
    """MODELS_DB: the key of the frozen tensors of ``job``'s model."""
    return key(job, FROZEN)


def models_prefix(job: str) -> bytes:
    """MODELS_DB: the prefix of every model version (and the frozen tensors) of ``job``."""
    return job_prefix(job)


# ----- devices and tokens
def device_key(job: str, device_id: str) -> bytes:
    """DEVICES_DB: the key of a device's record."""
    return key(job, device_id)


def devices_prefix(job: str) -> bytes:
    """DEVICES_DB: the prefix of every device of ``job``."""
    return job_prefix(job)


def token_key(digest: bytes) -> bytes:
    """TOKENS_DB: the key of a bearer token, its SHA-256 digest."""
    return digest


def token_value(job: str, device_id: str) -> bytes:
    """TOKENS_DB: the value a token maps to (``job \\0 device id``)."""
    return key(job, device_id)


def token_owner(value: bytes) -> tuple[str, str]:
    """(job, device id) of a TOKENS_DB value."""
    job, _, device_id = value.partition(SEP)
    return job.decode(), device_id.decode()


# ----- tasks
def task_key(job: str, task_id: str) -> bytes:
    """TASKS_DB: the key of a task's record."""
    return key(job, task_id)


def tasks_prefix(job: str) -> bytes:
    """TASKS_DB: the prefix of every task of ``job``."""
    return job_prefix(job)


# ----- updates (robust aggregators) and running sums (FedAvg)
def update_key(job: str, phase_id: int, task_id: str) -> bytes:
    """UPDATES_DB: the key of the accepted update of a task of phase ``phase_id``."""
    return key(job, phase_id, task_id)


def updates_prefix(job: str, phase_id: int | None = None) -> bytes:
    """UPDATES_DB: the prefix of the updates of one phase of ``job``, or of all its phases."""
    return job_prefix(job) if phase_id is None else key(job, phase_id)


def sum_keys(job: str, phase_id: int) -> tuple[bytes, bytes]:
    """SUMS_DB: the keys of phase ``phase_id``'s running sum: (accumulator, meta)."""
    return key(job, phase_id, "acc"), key(job, phase_id, "meta")


def sums_prefix(job: str, phase_id: int | None = None) -> bytes:
    """SUMS_DB: the prefix of one phase's running sum of ``job``, or of all its phases."""
    return job_prefix(job) if phase_id is None else key(job, phase_id)


# ----- strategy state
def strategy_key(job: str, name: str) -> bytes:
    """STRATEGY_DB: the key of one piece of ``job``'s round-engine state (``server_opt``, ``buffer``...)."""
    return key(job, name)


def strategy_prefix(job: str) -> bytes:
    """STRATEGY_DB: the prefix of every piece of ``job``'s round-engine state."""
    return job_prefix(job)


# ----- batch helpers
def wipe_job(batch: WriteBatch, job: str) -> WriteBatch:
    """Add the deletion of everything ``job`` has in every job-scoped database (its record and its
    devices' tokens are the caller's: tokens are found through the device records)."""
    for db in JOB_SCOPED_DBS:
        batch.delete_prefix(db, job_prefix(job))
    return batch


def drop_round_state(batch: WriteBatch, job: str, phase_id: int | None = None) -> WriteBatch:
    """Add the deletion of the stored updates and running sums (UPDATES_DB, SUMS_DB) of one phase of
    ``job``, or of all its phases: what a closed phase, or an ended job that never resumes its round, drops.
    STRATEGY_DB is kept: it outlives phases."""
    return (batch.delete_prefix(UPDATES_DB, updates_prefix(job, phase_id))
            .delete_prefix(SUMS_DB, sums_prefix(job, phase_id)))
