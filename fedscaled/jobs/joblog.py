"""Job event logs: append-only lines in the store, and waiters for ``logs -f``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store, WriteBatch

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def format_event(event: dict[str, Any]) -> str:
    """One log line: ``2026-11-28 22:40:01 INFO message`` (UTC)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event["ts"]))
    return f"{stamp} {event['level']} {event['message']}"


class JobLog:
    """Appends events to the store and wakes followers of each job's log."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._next_seq: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def next_seq(self, job: str) -> int:
        """The sequence number the next event of ``job`` gets (1-based)."""
        if job not in self._next_seq:
            last = self._store.scan_keys(layout.EVENTS_DB, layout.events_prefix(job))
            self._next_seq[job] = (layout.event_seq(last[-1]) + 1) if last else 1
        return self._next_seq[job]

    def add(self, batch: WriteBatch, job: str, message: str, level: str = "INFO",
            **fields: Any) -> dict[str, Any]:
        """Add an event to ``batch`` (committed with the state change it describes)."""
        seq = self.next_seq(job)
        self._next_seq[job] = seq + 1
        event = {"seq": seq, "ts": time.time(), "level": level, "message": message, **fields}
        batch.put_json(layout.EVENTS_DB, layout.event_key(job, seq), event)
        return event

    def notify(self, job: str) -> None:
        """Wake followers of ``job`` (call after the batch is committed)."""
        waiter = self._changed.pop(job, None)
        if waiter is not None:
            waiter.set()

    async def append(self, job: str, message: str, level: str = "INFO", **fields: Any) -> dict[str, Any]:
        """Append one event durably and wake followers."""
        batch = WriteBatch()
        event = self.add(batch, job, message, level, **fields)
        await self._store.commit(batch)
        self.notify(job)
        return event

    def read(self, job: str, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Events with ``seq > since``, oldest first."""
        rows = self._store.scan(layout.EVENTS_DB, layout.events_prefix(job), start=layout.event_key(job, since + 1),
                                limit=limit)
        return [json.loads(v) for _, v in rows]

    async def wait(self, job: str, timeout: float) -> None:
        """Wait until ``job`` gets a new event (or ``timeout`` seconds pass)."""
        waiter = self._changed.setdefault(job, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout)

    def forget(self, job: str) -> None:
        """Drop cached state of a deleted job (on --replace)."""
        self._next_seq.pop(job, None)
        self.notify(job)
