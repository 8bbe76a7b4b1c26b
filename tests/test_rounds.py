"""The pure round rules: plans, selection, eligibility, learning-rate decay, test-result merging."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedscaled.core import rounds
from fedscaled.core.config import JobConfig, parse_job_text
from fedscaled.core.rounds import TEST, TRAIN, DeviceStatus


def config(**values: object) -> JobConfig:
    lines = "".join(f"  - {k}: {v}\n" for k, v in {"job_name": "t", **values}.items())
    return parse_job_text("job_conf:\n" + lines)


PHONE = DeviceStatus(battery=80, charging=True, idle=True, unmetered=True, free_storage_mb=500, num_samples=100,
                     backends=("jax",))


def test_plan_tests_initial_model_then_every_eval_interval_and_the_last_round() -> None:
    c = config(rounds=7, eval_interval=3)
    assert rounds.next_plan(c, 0, None) == rounds.Plan(TEST, 1, 0)
    assert rounds.next_plan(c, 0, 0) == rounds.Plan(TRAIN, 1, 0)
    assert rounds.next_plan(c, 2, 0) == rounds.Plan(TRAIN, 3, 2)
    assert rounds.next_plan(c, 3, 0) == rounds.Plan(TEST, 3, 3)
    assert rounds.next_plan(c, 3, 3) == rounds.Plan(TRAIN, 4, 3)
    assert rounds.next_plan(c, 7, 6) == rounds.Plan(TEST, 7, 7)
    assert rounds.next_plan(c, 7, 7) == rounds.Plan("finish", 7, 7)


def test_learning_rate_decays_every_decay_round_with_a_floor() -> None:
    c = config(learning_rate=0.1, decay_factor=0.5, decay_round=2, min_learning_rate=0.02)
    assert [rounds.learning_rate(c, r) for r in range(1, 8)] == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.02]


@given(st.lists(st.text(min_size=1, max_size=6), min_size=0, max_size=40, unique=True),
       st.integers(min_value=0, max_value=50), st.integers(min_value=0, max_value=10**6))
def test_selection_is_a_seeded_subset(pool: list[str], count: int, seed: int) -> None:
    chosen = rounds.select(pool, count, seed)
    assert len(chosen) == min(count, len(pool))
    assert set(chosen) <= set(pool)
    assert len(set(chosen)) == len(chosen)
    assert chosen == rounds.select(list(reversed(pool)), count, seed)  # arrival order does not matter


def test_selection_is_random_not_first_come() -> None:
    pool = [f"d{i:03d}" for i in range(100)]
    picks = [tuple(rounds.select(pool, 10, seed)) for seed in range(20)]
    assert len(set(picks)) == 20
    counts = {d: sum(d in p for p in picks) for d in pool}
    assert max(counts.values()) < 10  # spread over the pool


@pytest.mark.parametrize(("change", "reason"), [
    ({"charging": False}, "not charging"),
    ({"unmetered": False}, "metered network"),
    ({"battery": 10}, "battery below 20%"),
    ({"num_samples": 5}, "fewer than 32 samples"),
])
def test_state_policy(change: dict[str, object], reason: str) -> None:
    c = config()
    assert rounds.ineligible_reason(c, PHONE) is None
    status = replace(PHONE, **change)  # type: ignore[arg-type]
    assert rounds.ineligible_reason(c, status) == reason


def test_policy_switches_and_test_tasks_ignore_sample_filters() -> None:
    c = config(require_charging="false", require_idle="true", filter_less=10)
    assert rounds.ineligible_reason(c, replace(PHONE, charging=False)) is None
    assert rounds.ineligible_reason(c, replace(PHONE, idle=False)) == "not idle"
    few = replace(PHONE, num_samples=3)
    assert rounds.ineligible_reason(c, few, TRAIN) is not None
    assert rounds.ineligible_reason(c, few, TEST) is None


def test_phase_opens_on_a_full_pool_or_after_the_window_with_a_quorum() -> None:
    c = config(num_participants=10, overcommitment=1.3, selection_window=5)
    assert rounds.phase_sizes(c, TRAIN) == (13, 10, 5)
    assert rounds.should_open(c, 13, 0.0, TRAIN)
    assert not rounds.should_open(c, 12, 4.9, TRAIN)
    assert rounds.should_open(c, 5, 5.0, TRAIN)
    assert not rounds.should_open(c, 4, 100.0, TRAIN)


def test_test_results_are_sample_weighted_up_to_the_median() -> None:
    merged = rounds.merge_test_results([
        {"samples": 10, "correct_top1": 10, "correct_top5": 10, "loss_sum": 1.0},
        {"samples": 20, "correct_top1": 0, "correct_top5": 10, "loss_sum": 20.0},
        {"samples": 90, "correct_top1": 0, "correct_top5": 45, "loss_sum": 90.0},
    ])
    # Median 20: the 90-sample device counts as 20.
    assert merged is not None
    assert merged["test_len"] == 50.0
    assert abs(merged["top_1"] - 10 / 50) < 1e-12
    assert abs(merged["top_5"] - (10 + 10 + 10) / 50) < 1e-12
    assert abs(merged["loss"] - (1.0 + 20.0 + 20.0) / 50) < 1e-12
    assert rounds.merge_test_results([]) is None


def test_one_device_claiming_huge_counts_moves_the_metric_by_its_share_only() -> None:
    honest = [{"samples": 50, "correct_top1": 49, "correct_top5": 50, "loss_sum": 5.0} for _ in range(3)]
    liar = {"samples": 10**15, "correct_top1": 0, "correct_top5": 0, "loss_sum": 0.0, "max_samples": 10**15}
    merged = rounds.merge_test_results([*honest, liar])
    assert merged is not None
    assert abs(merged["top_1"] - 0.98 * 3 / 4) < 1e-9  # one device of four: a quarter of the weight
    # Its reported local data caps it too.
    capped = rounds.merge_test_results([*honest, {**liar, "max_samples": 10}])
    assert capped is not None and capped["test_len"] == 160.0


def test_retry_window_respects_bounds() -> None:
    c = config(retry_min=2, retry_max=30)
    assert rounds.retry_window(c) == {"min": 2.0, "max": 30.0}
    assert rounds.retry_window(c, 10.0) == {"min": 2.0, "max": 10.0}
    assert rounds.retry_window(c, 0.5) == {"min": 2.0, "max": 2.0}


def test_fedscale_log_wording() -> None:
    line = rounds.fedscale_round_line(3, 12.4, 13, 10, 1.23456)
    assert line == ("Wall clock: 12 s, round: 3, Planned participants: 13, Succeed participants: 10, "
                    "Training loss: 1.2346")
