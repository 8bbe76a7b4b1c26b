"""Reusable receive buffers for upload bodies.

A fresh multi-megabyte buffer costs a page fault (and the kernel zeroing a page) for every 4 KiB the
socket data is copied into. Profiled under 50 concurrent 4 MB uploads, that was the largest single cost
of the upload path: with 16 pooled buffers the copy into the buffer took 38 % of the daemon's busy CPU,
with enough buffers for every upload in flight 11 %, and ingest rose from 161 to 198-214 updates/s.

So the pool keeps as many free buffers as uploads have recently been in flight together, within two bounds:
``max_bytes`` of free buffers in all, and ``idle_seconds``: a buffer nobody has taken for that long is
given back to the kernel. Memory therefore follows the upload concurrency of the last minute, never the
number of participants, and falls back to nothing when uploads stop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedscaled.core.aligned import ALIGNMENT

Raw = np.ndarray[Any, np.dtype[np.uint8]]

# Capacities are rounded up to this, so that bodies of one model (whose headers differ by a few bytes)
# share buffers.
GRANULE = 64 * 1024
DEFAULT_MAX_BYTES = 1 << 30  # free buffers kept at most (in flight, bodies are bounded by the job limits)
DEFAULT_IDLE_SECONDS = 60.0


class BodyPool:
    """A bounded free list of raw byte buffers, emptied of the ones left unused for ``idle_seconds``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._free: list[tuple[Raw, float]] = []  # (buffer, when it was released), oldest first
        self._free_bytes = 0
        self._trim_timer: asyncio.TimerHandle | None = None

    @property
    def free_bytes(self) -> int:
        """Bytes held in free buffers now."""
        return self._free_bytes

    def __len__(self) -> int:
        return len(self._free)

    def acquire(self, nbytes: int, aligned_offset: int) -> tuple[Raw, Raw]:
        """(raw, body): ``body`` is a view of ``nbytes`` in ``raw`` whose byte ``aligned_offset`` is 64-byte
        aligned. Give ``raw`` back with :meth:`release` once nothing refers to ``body`` any more."""
        need = nbytes + ALIGNMENT
        # The most recently released fitting buffer: its pages are the likeliest to be still in cache.
        for index in range(len(self._free) - 1, -1, -1):
            raw = self._free[index][0]
            if need <= raw.shape[0] <= 2 * need + GRANULE:
                del self._free[index]
                self._free_bytes -= raw.shape[0]
                break
        else:
            raw = np.empty(-(-need // GRANULE) * GRANULE, dtype=np.uint8)
        shift = (-(raw.ctypes.data + aligned_offset)) % ALIGNMENT
        return raw, raw[shift : shift + nbytes]

    def release(self, raw: Raw) -> None:
        """Return a buffer for reuse: kept while the free buffers stay within ``max_bytes`` (the oldest go first)."""
        self._free.append((raw, self._clock()))
        self._free_bytes += raw.shape[0]
        while self._free_bytes > self.max_bytes:
            dropped, _ = self._free.pop(0)
            self._free_bytes -= dropped.shape[0]
        self._arm_trim()

    def trim(self) -> None:
        """Drop the free buffers released more than ``idle_seconds`` ago."""
        cutoff = self._clock() - self.idle_seconds
        while self._free and self._free[0][1] <= cutoff:
            dropped, _ = self._free.pop(0)
            self._free_bytes -= dropped.shape[0]

    def _arm_trim(self) -> None:
        # One timer at a time, at the oldest free buffer's expiry; outside an event loop (tests, tools) the
        # caller trims.
        if self._trim_timer is not None or not self._free:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        delay = max(0.0, self._free[0][1] + self.idle_seconds - self._clock())
        self._trim_timer = loop.call_later(delay, self._on_trim_timer)

    def _on_trim_timer(self) -> None:
        self._trim_timer = None
        self.trim()
        self._arm_trim()

    def close(self) -> None:
        """Drop every free buffer and the trim timer (the server is shutting down)."""
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        self._free.clear()
        self._free_bytes = 0
