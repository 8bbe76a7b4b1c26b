"""The LMDB store: the only module that opens LMDB.

It stores bytes and small JSON records in named databases; it knows nothing of rounds or aggregation.
Which database holds what, under which key, is :mod:`fedscaled.store.layout` (the one place keys are
spelled); this module gives the mechanics: :func:`key` builds composite keys, :class:`WriteBatch` collects
puts and deletes, :class:`Store` applies them and reads.

Every write goes through :meth:`Store.commit`, one synced transaction, on one writer thread (LMDB write
transactions must stay on one OS thread). ``MapFullError`` grows the map and retries.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import queue
import struct
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from fedscaled import faults
from fedscaled.errors import StorageFull, StoreError

log = logging.getLogger("fedscaled.store")
# A full disk is logged at most once per this many seconds (a fleet retrying would otherwise flood the log).
FULL_LOG_INTERVAL = 60.0
FULL_RETRY_AFTER = 30

SCHEMA_VERSION = 1
# The named databases; fedscaled.store.layout says what each holds.
DATABASES = ("meta", "jobs", "events", "models", "devices", "tokens", "tasks", "updates", "sums", "strategy")
INITIAL_MAP_SIZE = 1 << 30  # 1 GiB: sparse on Linux, grows on demand
# Group commit bounds: enough to fold a burst of uploads into one fsync, small enough that one
# transaction stays short and a failure retries little.
GROUP_COMMIT_BYTES = 256 << 20
GROUP_COMMIT_BATCHES = 256
SEP = b"\0"


def u64(n: int) -> bytes:
    """Big-endian u64, so that LMDB's byte order is numeric order."""
    return struct.pack(">Q", n)


def key(*parts: str | int | bytes) -> bytes:
    """A composite key: strings and bytes joined by NUL, integers as big-endian u64."""
    out = bytearray()
    for index, part in enumerate(parts):
        if index and not isinstance(parts[index - 1], int):
            out += SEP
        if isinstance(part, int):
            out += u64(part)
        elif isinstance(part, str):
            out += part.encode()
        else:
            out += part
    return bytes(out)


def dump_json(record: Any) -> bytes:
    """Compact JSON bytes for a record."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class WriteBatch:
    """Puts and deletes applied atomically by :meth:`Store.commit`."""

    ops: list[tuple[str, bytes, bytes | memoryview | None]] = field(default_factory=list)
    delete_prefixes: list[tuple[str, bytes]] = field(default_factory=list)

    def put(self, db: str, k: bytes, value: bytes | memoryview) -> WriteBatch:
        """Store ``value`` under ``k`` in database ``db``."""
        self.ops.append((db, k, value))
        return self

    def put_json(self, db: str, k: bytes, record: Any) -> WriteBatch:
        """Store a JSON record."""
        return self.put(db, k, dump_json(record))

    def delete(self, db: str, k: bytes) -> WriteBatch:
        """Delete ``k`` (no error if absent)."""
        self.ops.append((db, k, None))
        return self

    def delete_prefix(self, db: str, prefix: bytes) -> WriteBatch:
        """Delete every key starting with ``prefix`` (applied before the puts)."""
        self.delete_prefixes.append((db, prefix))
        return self


class Store:
    """An LMDB environment with named databases, one writer thread and synced commits."""

    def __init__(self, path: Path, *, map_size: int = INITIAL_MAP_SIZE, sync: bool = True) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            # No writemap: measured through the upload path it halved ingest (a page fault per 4 KiB written
            # and an msync of the whole map per commit).
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DATABASES) + 2, sync=sync,
                                  metasync=sync, readahead=False, max_readers=256)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        self._dbs = {name: self._env.open_db(name.encode()) for name in DATABASES}
        # Readers hold this shared-ish lock only to exclude a concurrent map resize (set_mapsize must
        # not run while a transaction of this process is open).
        self._resize_lock = threading.RLock()
        self._queue: queue.SimpleQueue[tuple[WriteBatch, Future[None]] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="lmdb-writer", daemon=True)
        self._writer.start()
        self.commits = 0  # synced transactions so far (group commit folds many batches into one)
        self.full_since: float | None = None  # monotonic time of the first write refused for a full disk
        self._full_logged = -FULL_LOG_INTERVAL
        self._check_schema()

    # ----- lifecycle
    def close(self) -> None:
        """Finish queued writes and close the environment."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._env.close()

    def _check_schema(self) -> None:
        with self._env.begin(db=self._dbs["meta"]) as txn:
            found = txn.get(b"schema_version")
        if found is None:
            self.commit_sync(WriteBatch().put("meta", b"schema_version", str(SCHEMA_VERSION).encode()))
        elif int(found) != SCHEMA_VERSION:
            raise StoreError(f"store at {self.path} has schema version {int(found)}, this daemon reads "
                             f"{SCHEMA_VERSION}")

    # ----- writes
    def _submit(self, batch: WriteBatch) -> Future[None]:
        if not self._writer.is_alive():
            raise StoreError("the store is closed")
        unknown = {db for db, _, _ in batch.ops} | {db for db, _ in batch.delete_prefixes}
        unknown -= set(self._dbs)
        if unknown:
            raise StoreError(f"unknown store database(s): {', '.join(sorted(unknown))}")
        done: Future[None] = Future()
        self._queue.put((batch, done))
        return done

    def commit_sync(self, batch: WriteBatch) -> None:
        """Apply ``batch`` in one synced transaction on the writer thread; wait for it."""
        self._submit(batch).result()

    async def commit(self, batch: WriteBatch) -> None:
        """Apply ``batch`` durably; returns after the data is synced to disk."""
        await asyncio.wrap_future(self._submit(batch))

    def _write_loop(self) -> None:
        """The one writer thread: group commit.

        Batches queued while a transaction was syncing are applied together in the next transaction,
        so N concurrent uploads cost one fsync instead of N. Each batch's future resolves only after the
        transaction that holds it is synced: the durability promise is unchanged.
        """
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            size = _batch_bytes(first[0])
            while size < GROUP_COMMIT_BYTES and len(group) < GROUP_COMMIT_BATCHES:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this group, then stop
                    break
                group.append(item)
                size += _batch_bytes(item[0])
            self._commit_group(group)

    def _commit_group(self, group: list[tuple[WriteBatch, Future[None]]]) -> None:
        try:
            self._apply_growing([batch for batch, _ in group])
        except Exception as exc:
            if len(group) == 1:
                _resolve(group[0][1], exc)
                return
            # One bad batch must not fail its neighbours: retry each alone.
            for item in group:
                self._commit_group([item])
            return
        for _, done in group:
            _resolve(done)

    def _apply_growing(self, batches: list[WriteBatch]) -> None:
        while True:
            try:
                faults.fail_if_store_full()
                self._apply(batches)
                self.commits += 1
                if self.full_since is not None:
                    log.warning("store writes succeed again after %.0f s of a full disk",
                                time.monotonic() - self.full_since)
                    self.full_since = None
                return
            except lmdb.MapFullError:
                try:
                    self._grow()
                except (lmdb.Error, OSError) as exc:
                    self._disk_full(exc)
                    raise StoreError(f"store could not grow: {exc}") from exc
            except (lmdb.Error, OSError) as exc:
                self._disk_full(exc)
                raise StoreError(f"store write failed: {exc}") from exc

    def _disk_full(self, exc: BaseException) -> None:
        """Turn a full disk into StorageFull (507 + Retry-After), logged once per interval."""
        if getattr(exc, "errno", None) != errno.ENOSPC and "No space left" not in str(exc):
            return
        now = time.monotonic()
        if self.full_since is None:
            self.full_since = now
        if now - self._full_logged >= FULL_LOG_INTERVAL:
            self._full_logged = now
            log.error("store write failed: the disk of %s is full (%s); refusing writes with 507 until space "
                      "returns", self.path, exc)
        raise StorageFull("the daemon's disk is full; nothing was stored", retry_after=FULL_RETRY_AFTER) from None

    @property
    def full(self) -> bool:
        """Whether the last write failed for lack of disk space."""
        return self.full_since is not None

    def free_bytes(self) -> int:
        """Free space on the store's file system (for /healthz and /metrics)."""
        stat = os.statvfs(self.path)
        return int(stat.f_bavail * stat.f_frsize)

    def _apply(self, batches: list[WriteBatch]) -> None:
        with self._env.begin(write=True) as txn:
            for batch in batches:
                self._apply_one(txn, batch)

    def _apply_one(self, txn: lmdb.Transaction, batch: WriteBatch) -> None:
        for db_name, prefix in batch.delete_prefixes:
            cursor = txn.cursor(db=self._dbs[db_name])
            if cursor.set_range(prefix):
                # delete() moves the cursor to the next record; stop at the first key past the prefix.
                while bytes(cursor.key()).startswith(prefix):
                    if not cursor.delete():
                        break
        for db_name, k, value in batch.ops:
            db = self._dbs[db_name]
            if value is None:
                txn.delete(k, db=db)
            else:
                txn.put(k, value, db=db)

    def _grow(self) -> None:
        with self._resize_lock:
            current = self._env.info()["map_size"]
            self._env.set_mapsize(current * 2)

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes."""
        return int(self._env.info()["map_size"])

    # ----- reads (any thread; short transactions)
    def get(self, db: str, k: bytes) -> bytes | None:
        """The value of ``k`` in ``db`` (a copy), or None."""
        with self._resize_lock, self._env.begin(db=self._dbs[db]) as txn:
            value = txn.get(k)
            return bytes(value) if value is not None else None

    def get_json(self, db: str, k: bytes) -> Any:
        """A JSON record, or None."""
        raw = self.get(db, k)
        return json.loads(raw) if raw is not None else None

    def get_into(self, db: str, k: bytes, out: memoryview) -> bool:
        """Copy the value of ``k`` into ``out`` (exact size) without an intermediate copy."""
        with self._resize_lock, self._env.begin(db=self._dbs[db], buffers=True) as txn:
            value = txn.get(k)
            if value is None:
                return False
            if len(value) != len(out):
                raise StoreError(f"stored value has {len(value)} bytes, expected {len(out)}")
            out[:] = value
            return True

    def scan(self, db: str, prefix: bytes, *, start: bytes | None = None, limit: int | None = None
             ) -> list[tuple[bytes, bytes]]:
        """Key/value copies whose key starts with ``prefix``, from ``start`` (inclusive) on."""
        found: list[tuple[bytes, bytes]] = []
        with self._resize_lock, self._env.begin(db=self._dbs[db]) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start if start is not None else prefix):
                return found
            for k, v in cursor:
                if not k.startswith(prefix) or (limit is not None and len(found) >= limit):
                    break
                found.append((bytes(k), bytes(v)))
        return found

    def scan_keys(self, db: str, prefix: bytes) -> list[bytes]:
        """Keys starting with ``prefix``."""
        keys: list[bytes] = []
        with self._resize_lock, self._env.begin(db=self._dbs[db]) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for k in cursor.iternext(keys=True, values=False):
                    if not k.startswith(prefix):
                        break
                    keys.append(bytes(k))
        return keys

    def gather(self, db: str, keys: list[bytes], start: int, end: int, rows: list[memoryview]) -> None:
        """Copy bytes ``[start, end)`` of each key's value into ``rows[i]`` in one read transaction.

        Reads only the slice of every value (LMDB maps the file), so a robust aggregator can stream
        coordinate chunks of many stored updates without loading any update whole.
        """
        with self._resize_lock, self._env.begin(db=self._dbs[db], buffers=True) as txn:
            for k, row in zip(keys, rows, strict=True):
                value = txn.get(k)
                if value is None:
                    raise StoreError(f"stored value {k!r} vanished")
                row[:] = value[start:end]

    def count(self, db: str, prefix: bytes) -> int:
        """Number of keys under ``prefix``."""
        return len(self.scan_keys(db, prefix))

    def stat(self) -> dict[str, int]:
        """Entries per database and the map size, for status and metrics."""
        out: dict[str, int] = {"map_size": self.map_size}
        with self._resize_lock, self._env.begin() as txn:
            for name, db in self._dbs.items():
                out[name] = int(txn.stat(db)["entries"])
        return out


def open_store(data_dir: Path, *, sync: bool = True) -> Store:
    """Open (or create) the store under ``data_dir/store``."""
    return Store(Path(os.fspath(data_dir)) / "store", sync=sync)


def _resolve(done: Future[None], error: BaseException | None = None) -> None:
    """Resolve a commit's future, unless its waiter gave up (cancelled it): the writer thread must never die
    of an InvalidStateError, or every later commit would wait forever."""
    if done.cancelled():
        return
    try:
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
    except InvalidStateError:  # cancelled between the check and the call
        pass


def _batch_bytes(batch: WriteBatch) -> int:
    return sum(len(value) for _, _, value in batch.ops if value is not None)
