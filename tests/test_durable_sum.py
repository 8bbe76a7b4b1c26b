"""The FedAvg running sum as the durable record: grouped folds, checked values, restore."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedscaled import faults
from fedscaled.core import aggregate
from fedscaled.core.aligned import aligned_empty
from fedscaled.core.rounds import Task
from fedscaled.errors import InvalidTensor
from fedscaled.jobs.durable_sum import DurableSum
from fedscaled.store.lmdb_store import Store

SPECS = (("a/bias", (3,)), ("b/kernel", (2, 2)))


def task(i: int) -> Task:
    return Task(task_id=f"t{i}", device_id=f"d{i}", phase_id=1, kind="train", round=1, model_version=0,
                issued_at=0.0, deadline=1e12, result={"samples": 1, "loss": float(i)})


def flat(values: list[float]) -> np.ndarray:
    out = aligned_empty(7)
    out[:] = np.asarray(values, dtype=np.float32)
    return out


def test_group_with_a_bad_update_commits_the_good_ones_and_restores(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    durable = DurableSum(store, "job", 1, SPECS)
    good = [flat([1.0] * 7), flat([3.0] * 7)]
    nan = flat([0.0, 0.0, 0.0, 0.0, float("nan"), 0.0, 0.0])
    huge = flat([3e38] * 7)
    tasks = [task(i) for i in range(5)]

    async def run() -> list[BaseException | None]:
        adds = [durable.add(tasks[0], good[0], 1.0, tasks[0].result), durable.add(tasks[1], nan, 1.0, tasks[1].result),
                durable.add(tasks[2], good[1], 3.0, tasks[2].result), durable.add(tasks[3], huge, 1.0, tasks[3].result),
                durable.add(tasks[4], flat([3e38] * 7), 1.0, tasks[4].result)]
        return list(await asyncio.gather(*adds, return_exceptions=True))

    results = asyncio.run(run())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], InvalidTensor) and "'b/kernel' contains NaN or Inf" in results[1].message
    # One huge update still fits in float32; the second would overflow the sum.
    assert results[3] is None
    assert isinstance(results[4], InvalidTensor) and "overflow" in results[4].message
    assert [t.done for t in tasks] == [True, False, True, True, False]
    assert durable.accepted == 3
    expected = (1.0 * 1 + 3.0 * 3 + 3e38) / 5
    np.testing.assert_allclose(np.asarray(aggregate.fedavg_result(durable.state)), expected, rtol=1e-6)
    # A restart reads back exactly what was committed.
    again = DurableSum.restore(store, "job", 1, SPECS)
    assert (again.accepted, again.loss_weight) == (3, 5.0)
    np.testing.assert_array_equal(np.asarray(again.state.acc), np.asarray(durable.state.acc))
    store.close()


def test_failed_commit_leaves_the_sum_and_tasks_as_they_were(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    store = Store(tmp_path / "s")
    durable = DurableSum(store, "job", 1, SPECS)
    first = task(0)
    asyncio.run(durable.add(first, flat([2.0] * 7), 1.0, first.result))
    before = np.asarray(durable.state.acc).copy()
    flag = tmp_path / "disk-full"
    flag.touch()  # every commit fails as on a full disk, while the store stays readable
    monkeypatch.setitem(faults._paths, "store_full_while", str(flag))
    second = task(1)
    with pytest.raises(Exception, match=r"full|space"):
        asyncio.run(durable.add(second, flat([5.0] * 7), 1.0, second.result))
    assert not second.done
    assert durable.accepted == 1
    # The fold wrote into the accumulator in place; the committed sum was read back.
    np.testing.assert_array_equal(np.asarray(durable.state.acc), before)
    flag.unlink()
    third = task(2)
    asyncio.run(durable.add(third, flat([4.0] * 7), 1.0, third.result))  # the disk has room again
    np.testing.assert_allclose(np.asarray(aggregate.fedavg_result(durable.state)), 3.0, rtol=1e-6)
    store.close()


def test_a_commit_that_cannot_even_be_read_back_still_counts_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    durable = DurableSum(store, "job", 1, SPECS)
    first = task(0)
    asyncio.run(durable.add(first, flat([2.0] * 7), 1.0, first.result))
    store.close()  # every later commit fails, and so does reading the committed sum back
    second = task(1)
    with pytest.raises(Exception, match="closed"):
        asyncio.run(durable.add(second, flat([5.0] * 7), 1.0, second.result))
    assert not second.done
    assert durable.accepted == 1
