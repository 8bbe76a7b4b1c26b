"""The server optimizer's state, stored durably with the model version it produced.

Adaptive strategies (fed-yogi, fed-adam, fed-adagrad, fed-avgm) carry optax state from round to round:
moments the size of the model. It is written in the same transaction as the new model version, so after
a crash the state and the latest model always belong together. Stored as safetensors (one tensor per
leaf of the optax pytree, in tree order) with the model version in its metadata.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedscaled.core.strategies import ServerStrategy
from fedscaled.store import layout
from fedscaled.store.lmdb_store import Store, WriteBatch

SERVER_OPT = "server_opt"


def put(batch: WriteBatch, job: str, version: int, state: Any) -> WriteBatch:
    """Add the optimizer ``state`` that produced model ``version`` to ``batch``."""
    leaves = jax.tree_util.tree_leaves(state)
    tensors = {f"{index:04d}": np.asarray(leaf) for index, leaf in enumerate(leaves)}
    data = st_save(tensors, metadata={"model_version": str(version)})
    return batch.put(layout.STRATEGY_DB, layout.strategy_key(job, SERVER_OPT), data)


def load(store: Store, job: str, version: int, strategy: ServerStrategy, global_model: jax.Array) -> Any:
    """The stored state for model ``version`` (a fresh one when none is stored: before round 1).

    Raises RuntimeError when the stored state belongs to another version: the two are committed together,
    so that means a damaged store, and an adaptive optimizer must not silently restart its moments.
    """
    template = strategy.init_state(global_model)
    if template is None:
        return None
    data = store.get(layout.STRATEGY_DB, layout.strategy_key(job, SERVER_OPT))
    if data is None:
        if version != 0:
            raise RuntimeError(f"job {job}: no server optimizer state for model v{version}")
        return template
    tensors = st_load(data)
    stored_version = _version_of(data)
    if stored_version != version:
        raise RuntimeError(f"job {job}: server optimizer state is for model v{stored_version}, the model is "
                           f"v{version}")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(tensors) != len(leaves):
        raise RuntimeError(f"job {job}: stored server optimizer state has {len(tensors)} tensors, expected "
                           f"{len(leaves)}")
    restored = [jax.numpy.asarray(tensors[f"{index:04d}"], dtype=leaf.dtype) for index, leaf in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, restored)


def _version_of(data: bytes) -> int:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return int(header.get("__metadata__", {}).get("model_version", -1))
