"""Model retention: writing versions one by one and deleting what falls out leaves exactly the policy's set."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fedscaled.core.config import JOB_KEYS
from fedscaled.core.retention import Retention


def stored_after(policy: Retention, latest: int) -> set[int]:
    stored = {0}
    for version in range(1, latest + 1):
        stored.add(version)
        dropped = policy.falls_out(version)
        if dropped is not None:
            assert dropped in stored, f"v{dropped} deleted twice or never written"
            stored.remove(dropped)
    return stored


@settings(max_examples=200, deadline=None)
@given(keep=st.integers(0, 12), every=st.integers(0, 9), latest=st.integers(0, 120))
def test_incremental_deletes_leave_exactly_the_policy(keep: int, every: int, latest: int) -> None:
    policy = Retention(keep=keep, every=every)
    stored = stored_after(policy, latest)
    assert stored == {v for v in range(latest + 1) if policy.keeps(v, latest)}
    assert 0 in stored and latest in stored
    if keep > 0:
        assert set(range(max(0, latest - keep + 1), latest + 1)) <= stored  # the window is whole
        extra = {v for v in stored if v != 0 and v <= latest - keep}
        assert all(every > 0 and v % every == 0 for v in extra)
    else:
        assert stored == set(range(latest + 1))


def test_defaults_bound_a_thousand_rounds_to_twenty_versions() -> None:
    values = {key: spec.default for key, spec in JOB_KEYS.items()}
    policy = Retention.of(values)
    assert (policy.keep, policy.every) == (10, 100)
    assert sorted(stored_after(policy, 1000)) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900,
                                                  991, 992, 993, 994, 995, 996, 997, 998, 999, 1000]


def test_save_checkpoint_keeps_everything_and_async_keeps_what_stale_updates_need() -> None:
    values = {key: spec.default for key, spec in JOB_KEYS.items()}
    assert Retention.of({**values, "save_checkpoint": True}).falls_out(500) is None
    policy = Retention.of({**values, "model_retention": 2}, needed_back=5)
    assert policy.keep == 6  # a task up to max_staleness versions old can still be turned into a delta
    assert policy.falls_out(7) == 1 and policy.falls_out(6) is None
