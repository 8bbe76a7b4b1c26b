"""Oort participant selection: exploration/exploitation split, scoring, pacer, blacklist, persistence."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedscaled.core.config import JOB_KEYS, parse_job_text
from fedscaled.core.oort import DeviceStats, OortState, select_oort, update_stats


def conf(**overrides: Any) -> dict[str, Any]:
    """Job defaults with overrides (a dict: config parsing does not accept sample_mode oort yet)."""
    values = {key: spec.default for key, spec in JOB_KEYS.items()}
    values.update(overrides)
    return values


def fleet(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def known(devices: list[str], utility: float = 10.0, duration: float = 10.0, last_round: int = 1,
          count: int = 1) -> dict[str, DeviceStats]:
    return {d: DeviceStats(utility, duration, last_round, count) for d in devices}


@settings(max_examples=60, deadline=None)
# Found by CI: a negative-score rank n was cut off, 6 of 7 chosen.
@example(pool_size=8, count=7, explored=17, seed=0, round_number=21, factor=0.0, blacklist_rounds=-1)
@given(pool_size=st.integers(0, 40), count=st.integers(0, 50), explored=st.integers(0, 40),
       seed=st.integers(0, 2**32), round_number=st.integers(1, 100), factor=st.floats(0.0, 1.0),
       blacklist_rounds=st.sampled_from([-1, 1, 3]))
def test_selection_has_the_right_size_no_duplicates_and_only_pool_devices(
        pool_size: int, count: int, explored: int, seed: int, round_number: int, factor: float,
        blacklist_rounds: int) -> None:
    pool = fleet(pool_size)
    stats = {d: DeviceStats(float(i % 7), float(1 + i % 5), 1 + i % round_number, 1 + i % 4)
             for i, d in enumerate(fleet(explored))}
    c = conf(exploration_factor=factor, blacklist_rounds=blacklist_rounds)
    chosen, _ = select_oort(pool + pool[:3], count, stats, OortState.initial(c), round_number, c, seed)
    assert len(chosen) == min(count, pool_size)
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(pool)


def test_selection_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    pool = fleet(60)
    stats = {d: DeviceStats(float(i), 5.0 + i % 9, 1 + i % 3, 1) for i, d in enumerate(pool[:40])}
    c = conf(exploration_factor=0.5)
    state = OortState.initial(c)
    first = select_oort(pool, 10, stats, state, 4, c, seed=7)
    assert select_oort(list(reversed(pool)), 10, stats, state, 4, c, seed=7) == first
    assert len({tuple(select_oort(pool, 10, stats, state, 4, c, seed=s)[0]) for s in range(10)}) > 1


def test_exploration_share_is_honoured_and_falls_back_to_exploitation() -> None:
    pool = fleet(100)
    stats = known(pool[:50])
    c = conf(exploration_factor=0.3)
    for seed in range(5):
        chosen, _ = select_oort(pool, 10, stats, OortState.initial(c), 2, c, seed)
        assert sum(d not in stats for d in chosen) == 3
    # Only two unexplored devices checked in: both explored, exploitation takes the other eight.
    c = conf(exploration_factor=0.9)
    chosen, _ = select_oort([*pool[:50], "new1", "new2"], 10, stats, OortState.initial(c), 2, c, 0)
    assert {"new1", "new2"} <= set(chosen) and len(chosen) == 10


def test_empty_stats_is_pure_exploration_and_all_explored_is_pure_exploitation() -> None:
    pool = fleet(30)
    c = conf(exploration_factor=0.2)
    chosen, state = select_oort(pool, 12, {}, OortState.initial(c), 1, c, 3)
    assert len(chosen) == 12 and state.preferred_duration is None
    stats = known(pool)
    chosen, _ = select_oort(pool, 12, stats, OortState.initial(c), 2, c, 3)
    assert len(chosen) == 12 and set(chosen) <= set(stats)


def test_pool_smaller_than_count_returns_the_whole_pool() -> None:
    pool = fleet(5)
    c = conf()
    stats = known(pool[:2])
    chosen, _ = select_oort(pool, 20, stats, OortState.initial(c), 3, c, 1)
    assert chosen == sorted(pool)


def test_high_utility_devices_are_preferred_over_low_utility_ones() -> None:
    good, poor = fleet(20, "good"), fleet(80, "poor")
    stats = {**known(good, utility=100.0), **known(poor, utility=1.0)}

    def good_share(cut_off_util: float) -> float:
        c = conf(exploration_factor=0.0, exploration_min=0.0, cut_off_util=cut_off_util)
        picked = 0
        for seed in range(200):
            chosen, _ = select_oort(good + poor, 10, stats, OortState.initial(c), 5, c, seed)
            picked += sum(d.startswith("good") for d in chosen)
        return picked / (200 * 10)

    # Uniform selection would pick 20 % good devices. FedScale's default cut-off (0.05) admits nearly
    # everyone and draws by score; the paper's 0.95 admits only devices close to the cut-off score.
    assert good_share(0.05) > 0.5
    assert good_share(0.95) > 0.95


def test_slow_devices_are_penalised() -> None:
    fast, slow = fleet(50, "fast"), fleet(50, "slow")
    stats = {**known(fast, duration=10.0), **known(slow, duration=100.0)}
    c = conf(exploration_factor=0.0, exploration_min=0.0, round_threshold=30, round_penalty=2.0)
    picked_fast = 0
    for seed in range(100):
        chosen, state = select_oort(fast + slow, 10, stats, OortState.initial(c), 5, c, seed)
        picked_fast += sum(d.startswith("fast") for d in chosen)
    assert state.preferred_duration == 10.0
    assert picked_fast / (100 * 10) > 0.9
    # With round_threshold 100 there is no preferred duration and no penalty: roughly even.
    c = conf(exploration_factor=0.0, exploration_min=0.0, round_threshold=100)
    picked_fast = sum(sum(d.startswith("fast") for d in select_oort(fast + slow, 10, stats,
                                                                      OortState.initial(c), 5, c, s)[0])
                      for s in range(100))
    assert 0.35 < picked_fast / 1000 < 0.65


def test_stale_devices_get_a_bonus_and_the_cut_off_admits_only_the_best() -> None:
    stats = {"stale": DeviceStats(10.0, 10.0, 2, 1), "fresh": DeviceStats(10.0, 10.0, 40, 1)}
    c = conf(exploration_factor=0.0, exploration_min=0.0, cut_off_util=1.0)
    for seed in range(20):
        assert select_oort(["stale", "fresh"], 1, stats, OortState.initial(c), 50, c, seed)[0] == ["stale"]


def test_exploration_factor_decays_to_the_floor_once_per_round() -> None:
    c = conf(exploration_factor=0.9, exploration_decay=0.5, exploration_min=0.3)
    state = OortState.initial(c)
    seen = []
    for round_number in range(1, 5):
        _, state = select_oort(fleet(10), 4, {}, state, round_number, c, round_number)
        seen.append(state.exploration)
    assert seen == [0.45, 0.3, 0.3, 0.3]
    # A retried round (same round number) does not decay again.
    c = conf(exploration_factor=0.9, exploration_decay=0.5, exploration_min=0.0)
    _, once = select_oort(fleet(10), 4, {}, OortState.initial(c), 1, c, 0)
    _, again = select_oort(fleet(10), 4, {}, once, 1, c, 1)
    assert once.exploration == again.exploration == 0.45


def test_pacer_relaxes_the_duration_percentile_when_utility_stops_improving() -> None:
    pool = fleet(20)
    stats = {d: DeviceStats(5.0, float(i + 1), 1, 1) for i, d in enumerate(pool)}
    c = conf(exploration_factor=0.0, exploration_min=0.0, pacer_step=2, pacer_delta=10, round_threshold=30)
    state = OortState.initial(c)
    for round_number in range(1, 5):
        _, state = select_oort(pool, 5, stats, state, round_number, c, round_number)
    # Flat utility (all equal) over rounds 1-2 vs 3-4: relaxed once, at round 4.
    assert state.threshold == 40.0
    assert state.preferred_duration == 9.0  # 40th percentile of durations 1..20 (nearest rank)
    assert len(state.utility_history) == 4
    # Growing utility: no relaxation.
    rising = OortState(exploration=0.0, threshold=30.0, utility_history=[1.0, 1.0, 1.0], last_round=3)
    _, after = select_oort(pool, 5, stats, rising, 4, c, 0)
    assert after.threshold == 30.0


def test_blacklisted_devices_are_skipped_unless_nothing_else_is_left() -> None:
    pool = fleet(10)
    stats = known(pool)
    for d in pool[:3]:
        stats[d] = DeviceStats(1000.0, 1.0, 1, 9)  # great utility but over-used
    c = conf(exploration_factor=0.0, exploration_min=0.0, blacklist_rounds=5, blacklist_max_len=0.2)
    chosen, state = select_oort(pool, 5, stats, OortState.initial(c), 3, c, 0)
    assert state.blacklist == pool[:2]  # capped at 20 % of 10 explored devices
    assert not set(chosen) & set(state.blacklist)
    chosen, _ = select_oort(pool, 10, stats, OortState.initial(c), 3, c, 0)
    assert chosen == pool  # the round still gets its devices


def test_state_round_trips_through_its_record() -> None:
    c = conf()
    pool = fleet(30)
    stats = {d: DeviceStats(float(i), 1.0 + i, 1, 1 + i % 3) for i, d in enumerate(pool[:20])}
    state = OortState.initial(c)
    assert OortState.from_record(json.loads(json.dumps(state.to_record()))) == state
    for round_number in range(1, 4):
        _, state = select_oort(pool, 6, stats, state, round_number, conf(blacklist_rounds=1), round_number)
    assert state.preferred_duration is not None and state.blacklist and state.utility_history
    record = json.loads(json.dumps(state.to_record(), allow_nan=False))
    assert OortState.from_record(record) == state
    one = stats[pool[0]]
    assert DeviceStats.from_record(json.loads(json.dumps(one.to_record()))) == one


def test_update_stats_counts_participation_and_cleans_bad_reports() -> None:
    first = update_stats({}, "a", 3.5, 12.0, 4)
    assert first == DeviceStats(3.5, 12.0, 4, 1)
    second = update_stats({"a": first}, "a", math.nan, -1.0, 6)
    assert second == DeviceStats(0.0, 0.0, 6, 2)


def test_accepts_a_parsed_job_config() -> None:
    job = parse_job_text("job_conf:\n  - job_name: t\n  - exploration_factor: 0.5\n  - round_threshold: 50\n")
    state = OortState.initial(job)
    assert state.exploration == 0.5 and state.threshold == 50.0
    chosen, _ = select_oort(fleet(20), 8, known(fleet(10)), state, 2, job, 0)
    assert len(chosen) == 8 and sum(d not in fleet(10) for d in chosen) == 4
