"""The store layout's contract: keys byte-identical to the stored format, prefix scans per job, numeric
order of versions, and what replacing or ending a job deletes. Run against a real LMDB store."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedscaled.jobs import registry as registry_module
from fedscaled.jobs.devices import DeviceDirectory
from fedscaled.jobs.joblog import JobLog
from fedscaled.jobs.registry import JOB_RECORD_KEYS, JobRegistry
from fedscaled.store import layout
from fedscaled.store.lmdb_store import DATABASES, Store, WriteBatch, dump_json

JOBS = ("a", "ab", "b")  # "a" is a prefix of "ab": the NUL after a job name keeps them apart
# Spelled here, not taken from the layout: a database left out of layout.JOB_SCOPED_DBS must fail the tests.
JOB_SCOPED = ("events", "models", "devices", "tasks", "updates", "sums", "strategy")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store")
    yield opened
    opened.close()


# ----------------------------------------------------------------- the stored format
def test_keys_are_byte_identical_to_the_stored_format() -> None:
    # Written by hand from the format of fedscaled 1 (schema version 1): a daemon upgraded in place reads
    # these keys. Never change an expected value here to make a test pass.
    assert layout.job_key("mnist") == b"mnist"
    assert layout.job_name(b"mnist") == "mnist"
    assert layout.job_prefix("mnist") == b"mnist\x00"
    assert layout.event_key("mnist", 3) == b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x03"
    assert layout.model_key("mnist", 258) == b"mnist\x00\x00\x00\x00\x00\x00\x00\x01\x02"
    assert layout.frozen_key("mnist") == b"mnist\x00frozen"
    assert layout.device_key("mnist", "d-0a1b") == b"mnist\x00d-0a1b"
    assert layout.token_key(b"\xab" * 32) == b"\xab" * 32
    assert layout.token_value("mnist", "d-0a1b") == b"mnist\x00d-0a1b"
    assert layout.task_key("mnist", "t-7") == b"mnist\x00t-7"
    # No NUL after an integer part: the phase is fixed-width.
    assert layout.update_key("mnist", 2, "t-7") == b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x02t-7"
    assert layout.updates_prefix("mnist", 2) == b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x02"
    assert layout.updates_prefix("mnist") == b"mnist\x00"
    assert layout.sum_keys("mnist", 2) == (b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x02acc",
                                           b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x02meta")
    assert layout.sums_prefix("mnist", 2) == b"mnist\x00\x00\x00\x00\x00\x00\x00\x00\x02"
    assert layout.strategy_key("mnist", "server_opt") == b"mnist\x00server_opt"
    for prefix in (layout.events_prefix, layout.models_prefix, layout.devices_prefix, layout.tasks_prefix,
                   layout.strategy_prefix):
        assert prefix("mnist") == b"mnist\x00"
    assert layout.SCHEMA_VERSION_KEY == b"schema_version"


def test_databases_are_the_layouts() -> None:
    names = {layout.META_DB, layout.JOBS_DB, layout.EVENTS_DB, layout.MODELS_DB, layout.DEVICES_DB,
             layout.TOKENS_DB, layout.TASKS_DB, layout.UPDATES_DB, layout.SUMS_DB, layout.STRATEGY_DB}
    assert names == set(DATABASES)
    assert len(DATABASES) == 10
    assert set(layout.JOB_SCOPED_DBS) == set(JOB_SCOPED)
    assert registry_module.JOB_SCOPED_DBS == layout.JOB_SCOPED_DBS


def test_an_old_store_opens_with_the_new_database(tmp_path: Path) -> None:
    import lmdb

    # A store written before "strategy" existed: its databases and a job's model.
    old = lmdb.open(str(tmp_path / "store"), max_dbs=12)
    for name in DATABASES:
        if name != "strategy":
            with old.begin(write=True) as txn:
                db = old.open_db(name.encode(), txn=txn)
                if name == "meta":
                    txn.put(b"schema_version", b"1", db=db)
                if name == "models":
                    txn.put(b"j\x00" + u64(4), b"weights", db=db)
    old.close()
    store = Store(tmp_path / "store")
    try:
        assert store.get(layout.MODELS_DB, layout.model_key("j", 4)) == b"weights"
        store.commit_sync(WriteBatch().put(layout.STRATEGY_DB, layout.strategy_key("j", "m"), b"state"))
        assert store.get(layout.STRATEGY_DB, layout.strategy_key("j", "m")) == b"state"
    finally:
        store.close()


# ----------------------------------------------------------------- every job-scoped family
# (database, key of record ``i`` of a job, prefix of all that job's records)
Family = tuple[str, Callable[[str, int], bytes], Callable[[str], bytes]]
FAMILIES: dict[str, Family] = {
    "events": (layout.EVENTS_DB, lambda job, i: layout.event_key(job, i + 1), layout.events_prefix),
    "models": (layout.MODELS_DB, layout.model_key, layout.models_prefix),
    "devices": (layout.DEVICES_DB, lambda job, i: layout.device_key(job, f"d-{i}"), layout.devices_prefix),
    "tasks": (layout.TASKS_DB, lambda job, i: layout.task_key(job, f"t-{i}"), layout.tasks_prefix),
    "updates": (layout.UPDATES_DB, lambda job, i: layout.update_key(job, i % 2, f"t-{i}"),
                lambda job: layout.updates_prefix(job)),
    "sums": (layout.SUMS_DB, lambda job, i: layout.sum_keys(job, i // 2)[i % 2],
             lambda job: layout.sums_prefix(job)),
    "strategy": (layout.STRATEGY_DB, lambda job, i: layout.strategy_key(job, f"part{i}"), layout.strategy_prefix),
}


def test_families_cover_the_job_scoped_databases() -> None:
    assert {db for db, _, _ in FAMILIES.values()} == set(JOB_SCOPED)


def value(family: str, job: str, i: int) -> bytes:
    """A record (JSON: device records are read back when a job is replaced, for their token hash)."""
    return dump_json({"value": f"{family}/{job}/{i}", "token_hash": hashlib.sha256(f"{job}/{i}".encode()).hexdigest()})


def fill(store: Store, jobs: tuple[str, ...] = JOBS, n: int = 4) -> dict[tuple[str, str], dict[bytes, bytes]]:
    """``n`` records of every family for every job; returns what was written, by (family, job)."""
    written: dict[tuple[str, str], dict[bytes, bytes]] = {}
    batch = WriteBatch()
    for family, (db, key_of, _) in FAMILIES.items():
        for job in jobs:
            records = {key_of(job, i): value(family, job, i) for i in range(n)}
            assert len(records) == n, f"{family}: keys of one job collide"
            for k, v in records.items():
                batch.put(db, k, v)
            written[(family, job)] = records
    store.commit_sync(batch)
    return written


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_and_prefix_scan_per_job(store: Store, family: str) -> None:
    written = fill(store)
    db, key_of, prefix_of = FAMILIES[family]
    for job in JOBS:
        for i in range(4):
            assert store.get(db, key_of(job, i)) == value(family, job, i)
        scanned = dict(store.scan(db, prefix_of(job)))
        assert scanned == written[(family, job)], f"{family}: the scan of job {job!r} is not exactly its records"
        assert store.count(db, prefix_of(job)) == 4


def test_job_records_and_tokens_round_trip(store: Store) -> None:
    digest = bytes(range(32))
    store.commit_sync(WriteBatch()
                      .put_json(layout.JOBS_DB, layout.job_key("ab"), {"name": "ab"})
                      .put_json(layout.JOBS_DB, layout.job_key("a"), {"name": "a"})
                      .put(layout.TOKENS_DB, layout.token_key(digest), layout.token_value("ab", "d-1")))
    assert store.get_json(layout.JOBS_DB, layout.job_key("a")) == {"name": "a"}
    names = [layout.job_name(k) for k in store.scan_keys(layout.JOBS_DB, layout.JOBS_PREFIX)]
    assert names == ["a", "ab"]
    raw = store.get(layout.TOKENS_DB, layout.token_key(digest))
    assert raw is not None
    assert layout.token_owner(raw) == ("ab", "d-1")


def test_versions_and_seqs_sort_numerically(store: Store) -> None:
    versions = [0, 1, 2, 9, 10, 255, 256, 1000, 65_536, 1 << 40]
    shuffled = versions[:]
    random.Random(7).shuffle(shuffled)
    batch = WriteBatch().put(layout.MODELS_DB, layout.frozen_key("j"), b"frozen")
    for version in shuffled:
        batch.put(layout.MODELS_DB, layout.model_key("j", version), b"v%d" % version)
        batch.put(layout.EVENTS_DB, layout.event_key("j", version + 1), b"e")
    store.commit_sync(batch)
    keys = store.scan_keys(layout.MODELS_DB, layout.models_prefix("j"))
    # Every version first, in numeric order; the frozen tensors ("f" > any u64 below 0x66 << 56) last.
    assert keys == [layout.model_key("j", v) for v in versions] + [layout.frozen_key("j")]
    seqs = [layout.event_seq(k) for k in store.scan_keys(layout.EVENTS_DB, layout.events_prefix("j"))]
    assert seqs == [v + 1 for v in versions]
    # Scans resume from a seq, as `logs --since` does.
    rows = store.scan(layout.EVENTS_DB, layout.events_prefix("j"), start=layout.event_key("j", 258))
    assert [layout.event_seq(k) for k, _ in rows] == [1001, 65_537, (1 << 40) + 1]


def test_phase_prefixes_hold_exactly_that_phase(store: Store) -> None:
    batch = WriteBatch()
    for phase in (1, 2, 256, 257):
        for task in ("t-1", "t-2"):
            batch.put(layout.UPDATES_DB, layout.update_key("j", phase, task), b"%d" % phase)
        acc, meta = layout.sum_keys("j", phase)
        batch.put(layout.SUMS_DB, acc, b"acc").put(layout.SUMS_DB, meta, b"meta")
    store.commit_sync(batch)
    prefix = layout.updates_prefix("j", 1)
    tasks = [k[len(prefix):].decode() for k in store.scan_keys(layout.UPDATES_DB, prefix)]
    assert tasks == ["t-1", "t-2"]
    assert store.count(layout.UPDATES_DB, layout.updates_prefix("j")) == 8
    assert [v for _, v in store.scan(layout.SUMS_DB, layout.sums_prefix("j", 256))] == [b"acc", b"meta"]
    # Dropping phase 2 leaves phases 1, 256 and 257.
    store.commit_sync(layout.drop_round_state(WriteBatch(), "j", 2))
    assert store.count(layout.UPDATES_DB, layout.updates_prefix("j", 2)) == 0
    assert store.count(layout.SUMS_DB, layout.sums_prefix("j", 2)) == 0
    assert store.count(layout.UPDATES_DB, layout.updates_prefix("j")) == 6
    assert store.count(layout.SUMS_DB, layout.sums_prefix("j")) == 6


# ----------------------------------------------------------------- replacing and ending jobs
def job_text(name: str) -> str:
    return f"job_conf:\n  - job_name: {name}\n  - rounds: 3\n"


def snapshot(store: Store, job: str) -> dict[str, dict[bytes, bytes]]:
    return {db: dict(store.scan(db, layout.job_prefix(job))) for db in JOB_SCOPED}


def test_replacing_a_job_wipes_every_job_scoped_database(store: Store) -> None:
    registry = JobRegistry(store, JobLog(store))
    devices = DeviceDirectory(store)

    async def scenario() -> None:
        for job in ("a", "ab"):
            record = await registry.submit(job_text(job))
            batch, _, _ = devices.enroll_batch(job, record["enrollment_token"], record["enrollment_token"], {})
            await store.commit(batch)
            devices.committed(batch)
        fill(store, ("a", "ab"))
        tokens_before = dict(store.scan(layout.TOKENS_DB, b""))
        assert len(tokens_before) == 2
        ab_before = snapshot(store, "ab")
        assert all(ab_before.values()), "every job-scoped database of job ab holds records"
        assert all(snapshot(store, "a").values())

        await registry.stop("a")
        replaced = await registry.submit(job_text("a"), replace=True)
        assert replaced["state"] == "pending"

        after = snapshot(store, "a")
        for db in JOB_SCOPED:
            if db != layout.EVENTS_DB:
                assert after[db] == {}, f"{db} of the replaced job survived"
        # The only event left is the new submission's.
        assert [v for v in after[layout.EVENTS_DB].values() if b"submitted" in v] == list(
            after[layout.EVENTS_DB].values())
        # (Its seq continues the old log's, which the store still held when it was numbered.)
        assert len(after[layout.EVENTS_DB]) == 1
        assert snapshot(store, "ab") == ab_before, "replacing job a touched job ab"
        tokens = {k: layout.token_owner(v) for k, v in store.scan(layout.TOKENS_DB, b"")}
        assert [owner[0] for owner in tokens.values()] == ["ab"]
        assert store.get_json(layout.JOBS_DB, layout.job_key("ab"))["state"] == "pending"

    asyncio.run(scenario())


def test_ending_a_job_drops_only_its_round_state(store: Store) -> None:
    registry = JobRegistry(store, JobLog(store))

    async def scenario() -> None:
        await registry.submit(job_text("a"))
        await registry.submit(job_text("ab"))
        fill(store, ("a", "ab"))
        ab_before = snapshot(store, "ab")
        a_before = snapshot(store, "a")
        ended = await registry.stop("a")
        assert ended["state"] == "stopped"
        after = snapshot(store, "a")
        assert after[layout.UPDATES_DB] == {}
        assert after[layout.SUMS_DB] == {}
        for db in (layout.MODELS_DB, layout.DEVICES_DB, layout.TASKS_DB, layout.STRATEGY_DB):
            assert after[db] == a_before[db], f"ending a job dropped its {db}"
        assert snapshot(store, "ab") == ab_before

    asyncio.run(scenario())


# ----------------------------------------------------------------- the job record
def test_job_record_has_the_typed_keys(store: Store) -> None:
    registry = JobRegistry(store, JobLog(store))

    async def scenario() -> None:
        record = await registry.submit(job_text("a"))
        optional = {"oort", "strategy", "privacy"}
        assert set(record) == JOB_RECORD_KEYS - optional
        assert store.get_json(layout.JOBS_DB, layout.job_key("a")) == record
        updated = await registry.update("a", {"round": 2, "strategy": {"name": "fedavg"}})
        assert updated["round"] == 2
        assert updated["strategy"] == {"name": "fedavg"}
        assert registry.get("a") == updated
        with pytest.raises(ValueError, match="rnd"):
            await registry.update("a", {"rnd": 3})
        assert registry.get("a")["round"] == 2

    asyncio.run(scenario())
