"""The LMDB store: atomic batches, prefix scans, map growth, reopen."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedscaled.errors import StoreError
from fedscaled.store.lmdb_store import SEP, Store, WriteBatch, key


def test_batch_roundtrip_and_prefix_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    batch = WriteBatch().put_json("jobs", key("a"), {"n": 1})
    for seq in range(1, 4):
        batch.put("events", key("a", seq), b"e%d" % seq)
    batch.put("events", key("ab", 1), b"other")
    store.commit_sync(batch)
    assert store.get_json("jobs", key("a")) == {"n": 1}
    assert [v for _, v in store.scan("events", key("a") + SEP)] == [b"e1", b"e2", b"e3"]
    assert [v for _, v in store.scan("events", key("a") + SEP, start=key("a", 2))] == [b"e2", b"e3"]
    store.commit_sync(WriteBatch().delete_prefix("events", key("a") + SEP))
    assert store.count("events", key("a") + SEP) == 0
    assert store.get("events", key("ab", 1)) == b"other"
    store.close()


def test_map_grows_instead_of_failing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", map_size=1 << 20)
    blob = b"x" * (512 << 10)
    for index in range(8):
        asyncio.run(store.commit(WriteBatch().put("models", key("j", index), blob)))
    assert store.map_size > 1 << 20
    assert store.count("models", key("j") + SEP) == 8
    out = bytearray(len(blob))
    assert store.get_into("models", key("j", 3), memoryview(out))
    assert bytes(out) == blob
    store.close()


def test_reopen_keeps_data_and_checks_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.commit_sync(WriteBatch().put("jobs", key("k"), b"v"))
    store.close()
    again = Store(tmp_path / "s")
    assert again.get("jobs", key("k")) == b"v"
    again.commit_sync(WriteBatch().put("meta", b"schema_version", b"99"))
    again.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "s")


def test_group_commit_folds_concurrent_batches_and_isolates_a_bad_one(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")

    async def many() -> list[BaseException | None]:
        batches = [store.commit(WriteBatch().put("jobs", key(f"j{i}"), b"x" * 1000)) for i in range(50)]
        results = await asyncio.gather(*batches, return_exceptions=True)
        return list(results)

    async def with_a_bad_one() -> list[BaseException | None]:
        good = [store.commit(WriteBatch().put("jobs", key(f"k{i}"), b"y")) for i in range(5)]
        bad = store.commit(WriteBatch().put("jobs", b"k" * 2000, b"z"))  # key above LMDB's limit
        return list(await asyncio.gather(*good, bad, return_exceptions=True))

    before = store.commits
    assert asyncio.run(many()) == [None] * 50
    assert all(store.get("jobs", key(f"j{i}")) == b"x" * 1000 for i in range(50))
    assert store.commits - before < 50  # grouped into fewer synced transactions
    results = asyncio.run(with_a_bad_one())
    assert results[:5] == [None] * 5
    assert isinstance(results[5], StoreError)
    assert all(store.get("jobs", key(f"k{i}")) == b"y" for i in range(5))
    with pytest.raises(StoreError, match="unknown store database"):
        store.commit_sync(WriteBatch().put("nope", b"x", b"y"))
    store.close()
