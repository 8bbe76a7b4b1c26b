"""Robust aggregation streamed from real LMDB in coordinate chunks, against numpy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedscaled.core.config import parse_job_text
from fedscaled.errors import InvalidConfig
from fedscaled.jobs import robust
from fedscaled.store.lmdb_store import Store, WriteBatch, key


def stored_updates(tmp_path: Path, updates: np.ndarray) -> tuple[Store, list[bytes]]:
    store = Store(tmp_path / "s")
    batch = WriteBatch()
    keys = [key("job", 1, f"t{i}") for i in range(len(updates))]
    for k, update in zip(keys, updates, strict=True):
        batch.put("updates", k, update.astype(np.float32).tobytes())
    store.commit_sync(batch)
    return store, keys


# Sizes around the chunk size: less than one chunk, exactly one, and a ragged last chunk.
SIZES = [100, robust.CHUNK, robust.CHUNK * 2 + 37]


@pytest.mark.parametrize("num_params", SIZES)
def test_median_and_trimmed_mean_match_numpy(tmp_path: Path, num_params: int) -> None:
    rng = np.random.default_rng(num_params)
    updates = rng.normal(size=(7, num_params)).astype(np.float32)
    store, keys = stored_updates(tmp_path, updates)
    median = robust.robust_aggregate(store, keys, num_params, "median")
    np.testing.assert_allclose(median, np.median(updates, axis=0), rtol=1e-6, atol=1e-6)
    trimmed = robust.robust_aggregate(store, keys, num_params, "trimmed_mean", trim_fraction=0.3)
    ordered = np.sort(updates, axis=0)
    np.testing.assert_allclose(trimmed, ordered[2:5].mean(axis=0), rtol=1e-5, atol=1e-6)
    store.close()


def test_krum_picks_an_honest_update_despite_an_outlier(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    num_params = robust.CHUNK + 5
    honest = 1.0 + 0.01 * rng.normal(size=(6, num_params))
    hostile = np.full((1, num_params), 1e6)
    updates = np.concatenate([honest, hostile]).astype(np.float32)
    store, keys = stored_updates(tmp_path, updates)
    chosen = robust.robust_aggregate(store, keys, num_params, "krum", krum_f=1)
    assert any(np.array_equal(chosen, row) for row in updates[:6])
    median = robust.robust_aggregate(store, keys, num_params, "median")
    assert np.abs(median - 1.0).max() < 0.1  # the hostile update cannot drag the median
    mean = updates.astype(np.float64).mean(axis=0)
    assert np.abs(mean - 1.0).min() > 1e5  # ...while it ruins a plain mean
    store.close()


def test_krum_config_needs_enough_updates() -> None:
    with pytest.raises(InvalidConfig, match="krum with krum_f 2 needs at least 5 updates"):
        parse_job_text("job_conf:\n  - aggregator: krum\n  - krum_f: 2\n  - num_participants: 6\n")
    ok = parse_job_text("job_conf:\n  - aggregator: krum\n  - krum_f: 2\n  - num_participants: 6\n"
                        "  - min_participants: 5\n")
    assert ok["aggregator"] == "krum"
