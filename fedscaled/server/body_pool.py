"""Reusable receive buffers for upload bodies.

A fresh multi-megabyte buffer costs a page fault (and the kernel zeroing a page) for every 4 KiB the
socket data is copied into; profiled under 50 concurrent 4 MB uploads that was the largest single cost
of the upload path. Buffers are therefore kept and reused, at most ``max_buffers`` of them, so memory
stays bounded by the upload concurrency, not by the number of participants.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedscaled.core.aligned import ALIGNMENT

Raw = np.ndarray[Any, np.dtype[np.uint8]]

# Capacities are rounded up to this, so that bodies of one model (whose headers differ by a few bytes)
# share buffers.
GRANULE = 64 * 1024


class BodyPool:
    """A bounded free list of raw byte buffers."""

    def __init__(self, max_buffers: int = 16) -> None:
        self.max_buffers = max_buffers
        self._free: list[Raw] = []

    def acquire(self, nbytes: int, aligned_offset: int) -> tuple[Raw, Raw]:
        """(raw, body): ``body`` is a view of ``nbytes`` in ``raw`` whose byte ``aligned_offset`` is 64-byte
        aligned. Give ``raw`` back with :meth:`release` once nothing refers to ``body`` any more."""
        need = nbytes + ALIGNMENT
        for index, raw in enumerate(self._free):
            if need <= raw.shape[0] <= 2 * need + GRANULE:
                del self._free[index]
                break
        else:
            raw = np.empty(-(-need // GRANULE) * GRANULE, dtype=np.uint8)
        shift = (-(raw.ctypes.data + aligned_offset)) % ALIGNMENT
        return raw, raw[shift : shift + nbytes]

    def release(self, raw: Raw) -> None:
        """Return a buffer for reuse (dropped when the pool is full)."""
        if len(self._free) < self.max_buffers:
            self._free.append(raw)
