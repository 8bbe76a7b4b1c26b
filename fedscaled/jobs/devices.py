"""Device enrollment and bearer-token authentication.

A device enrolls in one job with that job's enrollment token and gets a device id and a bearer token.
Only the token's SHA-256 is stored (``tokens`` maps hash → job and device id); a lookup table in memory
saves a store read on every request. The operator may revoke a device (``fedscalectl revoke``): its record
gets ``revoked_at``, its token keeps its ``tokens`` entry so that its requests get 403 ``device_revoked``
(not 401: the device learns it should stop, rather than enroll again).

Memory per device (measured by ``python -m bench --only memory``): the lookup table holds the devices that
made a request in this daemon run, filled on each one's first request (two memory-mapped store reads),
not at enrollment: an enrolled device that never calls costs no memory, only its store records. Entries
are kept per job (token digest → device id; no (job, device) tuple per device), and ``last_seen`` shares
the same device id strings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from fedscaled.errors import BadRequest, DeviceNotFound, DeviceRevoked, Unauthorized
from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store, WriteBatch

MAX_DEVICE_INFO = 4096


def token_hash(token: str) -> bytes:
    """The stored form of a bearer token."""
    # surrogatepass: a header that is not valid UTF-8 (aiohttp keeps it as lone surrogates) hashes to a
    # token that matches nothing (401), instead of failing to encode (500).
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class LastSeen:
    """When each device last made an authenticated request (this daemon run only: not stored), per job."""

    __slots__ = ("_jobs",)

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, float]] = {}

    def get(self, device: tuple[str, str]) -> float | None:
        """The time (``time.time()``) of the last request of ``(job, device id)``; None: none this run."""
        seen = self._jobs.get(device[0])
        return None if seen is None else seen.get(device[1])

    def note(self, job: str, device_id: str, when: float) -> None:
        """Record a request of a device at ``when``."""
        seen = self._jobs.get(job)
        if seen is None:
            seen = self._jobs[job] = {}
        seen[device_id] = when

    def forget(self, job: str) -> None:
        """Drop a job's entries."""
        self._jobs.pop(job, None)

    def __len__(self) -> int:
        return sum(len(seen) for seen in self._jobs.values())


class DeviceDirectory:
    """Enrolled devices of every job."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Per job: token digest → device id, for the devices that made a request in this daemon run.
        self._by_hash: dict[str, dict[bytes, str]] = {}
        # Devices of cached tokens that are revoked (a token not cached is checked against its record).
        self._revoked: set[tuple[str, str]] = set()
        self.last_seen = LastSeen()
        # Enrolled, not revoked devices per job, counted once from the store when first needed.
        self._active: dict[str, int] = {}

    @staticmethod
    def check_enrollment_token(job: str, enrollment_token: str, presented: Any) -> None:
        """Unauthorized unless ``presented`` is the job's enrollment token (compared in constant time)."""
        if not isinstance(presented, str) or not hmac.compare_digest(
                presented.encode("utf-8", "surrogatepass"), enrollment_token.encode()):
            raise Unauthorized("wrong enrollment token for this job", job=job)

    def enroll_batch(self, job: str, enrollment_token: str, presented: Any, device_info: Any
                     ) -> tuple[WriteBatch, str, str]:
        """Check the enrollment token and prepare a new device's records; returns (batch, id, token)."""
        self.check_enrollment_token(job, enrollment_token, presented)
        info = device_info if device_info is not None else {}
        if not isinstance(info, dict) or len(json.dumps(info)) > MAX_DEVICE_INFO:
            raise BadRequest(f"device_info must be a JSON object of at most {MAX_DEVICE_INFO} bytes")
        device_id = "d-" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        digest = token_hash(token)
        record = {"device_id": device_id, "job": job, "token_hash": digest.hex(), "enrolled_at": time.time(),
                  "info": info}
        batch = (WriteBatch().put_json(layout.DEVICES_DB, layout.device_key(job, device_id), record)
                 .put(layout.TOKENS_DB, layout.token_key(digest), layout.token_value(job, device_id)))
        return batch, device_id, token

    def committed(self, batch: WriteBatch) -> None:
        """Count the devices of a committed enrollment batch. Their tokens are not cached here: a device
        enters the lookup table on its first request, so that enrolled devices that never call cost no
        memory (most of a large fleet is idle at any time)."""
        for db, _, value in batch.ops:
            if db == layout.TOKENS_DB and value is not None:
                job, _ = layout.token_owner(bytes(value))
                if job in self._active:
                    self._active[job] += 1

    def authenticate(self, job: str, authorization: str | None) -> str:
        """The device id behind an ``Authorization: Bearer`` header for ``job``; else Unauthorized."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # the scheme is case-insensitive (RFC 7235)
            raise Unauthorized("missing bearer token (Authorization: Bearer <device token>)")
        digest = token_hash(credentials.strip())
        cached = self._by_hash.get(job)
        device_id = cached.get(digest) if cached is not None else None
        if device_id is None:
            device_id = self._load(job, digest)
        if (job, device_id) in self._revoked:
            raise DeviceRevoked(f"device {device_id} was revoked by the operator of job {job}", job=job,
                                device_id=device_id)
        self.last_seen.note(job, device_id, time.time())
        return device_id

    def _load(self, job: str, digest: bytes) -> str:
        """A token not cached: look it up in the store, note whether its device is revoked, and cache it
        under its job. Unauthorized for an unknown token or one of another job (that one is not cached)."""
        raw = self.store.get(layout.TOKENS_DB, layout.token_key(digest))
        if raw is None:
            raise Unauthorized("unknown device token")
        owner, device_id = layout.token_owner(raw)
        if owner != job:
            raise Unauthorized("this device token belongs to another job")
        record = self.store.get_json(layout.DEVICES_DB, layout.device_key(job, device_id))
        if record is not None and record.get("revoked_at") is not None:
            self._revoked.add((job, device_id))
        cached = self._by_hash.get(job)
        if cached is None:
            cached = self._by_hash[job] = {}
        cached[digest] = device_id
        return device_id

    def is_revoked(self, job: str, device_id: str) -> bool:
        """Whether the device was revoked (as known to this directory's authentications and revocations)."""
        return (job, device_id) in self._revoked

    def check_active(self, job: str, device_id: str) -> None:
        """DeviceRevoked if the device was revoked since its request was authenticated."""
        if (job, device_id) in self._revoked:
            raise DeviceRevoked(f"device {device_id} was revoked by the operator of job {job}", job=job,
                                device_id=device_id)

    def record(self, job: str, device_id: str) -> dict[str, Any] | None:
        """The stored record of a device, or None."""
        found: dict[str, Any] | None = self.store.get_json(layout.DEVICES_DB, layout.device_key(job, device_id))
        return found

    def records(self, job: str) -> list[dict[str, Any]]:
        """Every device record of ``job``, by device id."""
        return [json.loads(raw) for _, raw in self.store.scan(layout.DEVICES_DB, layout.devices_prefix(job))]

    def active_count(self, job: str) -> int:
        """Devices of ``job`` enrolled and not revoked (counted from the store once, then kept)."""
        count = self._active.get(job)
        if count is None:
            count = self._active[job] = sum(1 for r in self.records(job) if r.get("revoked_at") is None)
        return count

    def revoke_batch(self, job: str, device_id: str, by: dict[str, Any]) -> WriteBatch | None:
        """The batch that marks a device revoked (None: it already is). BadRequest for an unknown device."""
        record = self.record(job, device_id)
        if record is None:
            raise DeviceNotFound(f"job {job} has no device {device_id[:64]!r}", job=job, device_id=device_id[:64])
        if record.get("revoked_at") is not None:
            self._revoked.add((job, device_id))  # known from the store; it was never counted as active
            return None
        record = {**record, "revoked_at": time.time(), "revoked_by": by}
        return WriteBatch().put_json(layout.DEVICES_DB, layout.device_key(job, device_id), record)

    def revoked(self, job: str, device_id: str) -> None:
        """Note a committed revocation: the device's token now answers 403."""
        if (job, device_id) not in self._revoked:
            self._revoked.add((job, device_id))
            if job in self._active:
                self._active[job] -= 1

    def forget_job(self, job: str) -> None:
        """Drop cached tokens of a replaced job."""
        self._by_hash.pop(job, None)
        self._revoked = {d for d in self._revoked if d[0] != job}
        self.last_seen.forget(job)
        self._active.pop(job, None)
