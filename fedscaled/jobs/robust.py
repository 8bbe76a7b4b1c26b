"""Byzantine-robust aggregation over the updates a round stored in LMDB.

Median, trimmed mean and Krum need every update of the round at once, per coordinate. Holding k
updates in memory would make the daemon O(participants * model); instead the stored updates are read
in coordinate chunks (``Store.gather`` slices each LMDB value in place), so memory stays
O(participants * chunk + model).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from fedscaled.core import aggregate
from fedscaled.core.aligned import aligned_empty
from fedscaled.store.lmdb_store import Store

# Coordinates per chunk: 64 Ki float32 = 256 KiB per update row, so a 100-update block is 25 MiB.
CHUNK = 1 << 16

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


def _chunks(num_params: int) -> range:
    return range(0, num_params, CHUNK)


def _read_block(store: Store, keys: list[bytes], block: FloatArray, start: int, num_params: int) -> int:
    """Fill ``block`` (k, CHUNK) with coordinates ``[start, start+CHUNK)`` of every update; zero-pad."""
    n = min(CHUNK, num_params - start)
    rows = [block[i, :n].data.cast("B") for i in range(len(keys))]
    store.gather("updates", keys, start * 4, (start + n) * 4, rows)
    if n < CHUNK:
        block[:, n:] = 0.0  # a fixed block shape: one compilation per update count
    return n


def robust_aggregate(store: Store, keys: list[bytes], num_params: int, method: str, *,
                     trim_fraction: float = 0.1, krum_f: int = 1) -> FloatArray:
    """The new global model from the stored updates ``keys`` by ``method`` (median, trimmed_mean, krum)."""
    k = len(keys)
    if k == 0:
        raise ValueError("robust aggregation needs at least one update")
    block: FloatArray = np.zeros((k, CHUNK), dtype=np.float32)
    out = aligned_empty(num_params)
    if method == "krum":
        dists = aggregate.pairwise_sq_dists_init(k)
        for start in _chunks(num_params):
            _read_block(store, keys, block, start, num_params)
            # jnp.array copies: the block is refilled before the donated accumulation has run.
            dists = aggregate.pairwise_sq_dists_accumulate(dists, jnp.array(block))
        chosen = aggregate.krum_select(dists, krum_f)
        store.get_into("updates", keys[chosen], out.data.cast("B"))
        return out
    trim = math.floor(trim_fraction * k)
    for start in _chunks(num_params):
        n = _read_block(store, keys, block, start, num_params)
        if method == "median":
            result = aggregate.median_chunk(jnp.array(block))
        elif method == "trimmed_mean":
            result = aggregate.trimmed_mean_chunk(jnp.array(block), trim)
        else:
            raise ValueError(f"unknown robust aggregator {method!r}")
        out[start:start + n] = np.asarray(result)[:n]
    return out
