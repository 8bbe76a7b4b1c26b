"""Device enrollment and bearer-token authentication.

A device enrolls in one job with that job's enrollment token and gets a device id and a bearer token.
Only the token's SHA-256 is stored (``tokens`` maps hash → job and device id); a lookup table in memory
saves a store read on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from fedscaled.errors import BadRequest, Unauthorized
from fedscaled.store.lmdb_store import SEP, Store, WriteBatch, key

MAX_DEVICE_INFO = 4096


def token_hash(token: str) -> bytes:
    """The stored form of a bearer token."""
    # surrogatepass: a header that is not valid UTF-8 (aiohttp keeps it as lone surrogates) hashes to a
    # token that matches nothing (401), instead of failing to encode (500).
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class DeviceDirectory:
    """Enrolled devices of every job."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_hash: dict[bytes, tuple[str, str]] = {}

    def enroll_batch(self, job: str, enrollment_token: str, presented: Any, device_info: Any
                     ) -> tuple[WriteBatch, str, str]:
        """Check the enrollment token and prepare a new device's records; returns (batch, id, token)."""
        if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), enrollment_token.encode()):
            raise Unauthorized("wrong enrollment token for this job", job=job)
        info = device_info if device_info is not None else {}
        if not isinstance(info, dict) or len(json.dumps(info)) > MAX_DEVICE_INFO:
            raise BadRequest(f"device_info must be a JSON object of at most {MAX_DEVICE_INFO} bytes")
        device_id = "d-" + secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        digest = token_hash(token)
        record = {"device_id": device_id, "job": job, "token_hash": digest.hex(), "enrolled_at": time.time(),
                  "info": info}
        batch = (WriteBatch().put_json("devices", key(job, device_id), record)
                 .put("tokens", digest, key(job, device_id)))
        return batch, device_id, token

    def committed(self, batch: WriteBatch) -> None:
        """Index the tokens of a committed enrollment batch."""
        for db, k, value in batch.ops:
            if db == "tokens" and value is not None:
                job, _, device = bytes(value).partition(SEP)
                self._by_hash[k] = (job.decode(), device.decode())

    def authenticate(self, job: str, authorization: str | None) -> str:
        """The device id behind an ``Authorization: Bearer`` header for ``job``; else Unauthorized."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # the scheme is case-insensitive (RFC 7235)
            raise Unauthorized("missing bearer token (Authorization: Bearer <device token>)")
        digest = token_hash(credentials.strip())
        found = self._by_hash.get(digest)
        if found is None:
            raw = self.store.get("tokens", digest)
            if raw is None:
                raise Unauthorized("unknown device token")
            job_b, _, device_b = raw.partition(SEP)
            found = (job_b.decode(), device_b.decode())
            self._by_hash[digest] = found
        if found[0] != job:
            raise Unauthorized("this device token belongs to another job")
        return found[1]

    def forget_job(self, job: str) -> None:
        """Drop cached tokens of a replaced job."""
        self._by_hash = {h: v for h, v in self._by_hash.items() if v[0] != job}
