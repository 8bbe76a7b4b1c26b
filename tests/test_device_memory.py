"""The device directory caches a token on the device's first request, not at enrollment, and keeps its
behaviour: wrong-job and unknown tokens are 401, revoked devices 403, replaced jobs forgotten."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedscaled.errors import DeviceRevoked, Unauthorized
from fedscaled.jobs.devices import DeviceDirectory
from fedscaled.store.lmdb_store import Store

TOKEN = "enrollment-token"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def enroll(devices: DeviceDirectory, store: Store, job: str) -> tuple[str, str]:
    batch, device_id, token = devices.enroll_batch(job, TOKEN, TOKEN, {"model": "test"})
    store.commit_sync(batch)
    devices.committed(batch)
    return device_id, token


def cached(devices: DeviceDirectory) -> int:
    return sum(len(tokens) for tokens in devices._by_hash.values())


def test_enrolled_devices_cost_no_cache_until_they_call(store: Store) -> None:
    devices = DeviceDirectory(store)
    assert devices.active_count("a") == 0
    enrolled = [enroll(devices, store, "a") for _ in range(5)]
    assert cached(devices) == 0 and len(devices.last_seen) == 0
    assert devices.active_count("a") == 5
    device_id, token = enrolled[0]
    assert devices.authenticate("a", f"Bearer {token}") == device_id
    assert devices.authenticate("a", f"bearer  {token} ") == device_id  # cached path, same answer
    assert cached(devices) == 1
    assert devices.last_seen.get(("a", device_id)) is not None
    assert devices.last_seen.get(("a", enrolled[1][0])) is None
    assert devices.last_seen.get(("b", device_id)) is None


def test_unknown_and_other_job_tokens_are_401_and_not_cached(store: Store) -> None:
    devices = DeviceDirectory(store)
    device_id, token = enroll(devices, store, "a")
    enroll(devices, store, "b")
    with pytest.raises(Unauthorized, match="another job"):
        devices.authenticate("b", f"Bearer {token}")
    assert devices.authenticate("a", f"Bearer {token}") == device_id
    with pytest.raises(Unauthorized, match="another job"):  # also once cached under its own job
        devices.authenticate("b", f"Bearer {token}")
    with pytest.raises(Unauthorized, match="unknown"):
        devices.authenticate("a", "Bearer nope")
    with pytest.raises(Unauthorized, match="missing"):
        devices.authenticate("a", "Basic x")
    assert cached(devices) == 1


def test_revoked_devices_are_403_cached_or_not(store: Store) -> None:
    devices = DeviceDirectory(store)
    (seen, seen_token), (idle, idle_token) = enroll(devices, store, "a"), enroll(devices, store, "a")
    assert devices.active_count("a") == 2
    devices.authenticate("a", f"Bearer {seen_token}")
    for device_id in (seen, idle):
        batch = devices.revoke_batch("a", device_id, {"uid": 0})
        assert batch is not None
        store.commit_sync(batch)
        devices.revoked("a", device_id)
    assert devices.active_count("a") == 0
    for token in (seen_token, idle_token):
        with pytest.raises(DeviceRevoked):
            devices.authenticate("a", f"Bearer {token}")
    # A new daemon run knows revocations from the records alone.
    fresh = DeviceDirectory(store)
    with pytest.raises(DeviceRevoked):
        fresh.authenticate("a", f"Bearer {idle_token}")
    assert fresh.is_revoked("a", idle) and not fresh.is_revoked("a", seen)
    assert fresh.active_count("a") == 0


def test_forget_job_drops_its_cache_and_last_seen(store: Store) -> None:
    devices = DeviceDirectory(store)
    a_id, a_token = enroll(devices, store, "a")
    b_id, b_token = enroll(devices, store, "b")
    devices.authenticate("a", f"Bearer {a_token}")
    devices.authenticate("b", f"Bearer {b_token}")
    devices.forget_job("a")
    assert cached(devices) == 1
    assert devices.last_seen.get(("a", a_id)) is None
    assert devices.last_seen.get(("b", b_id)) is not None
    # The token is still in the store (only a replaced job deletes it): it is looked up again.
    assert devices.authenticate("a", f"Bearer {a_token}") == a_id
