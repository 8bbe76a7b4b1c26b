"""Oort participant selection (Lai et al., OSDI'21): pure logic, no I/O.

Oort treats selection as a multi-armed bandit. A share of each round (the *exploration factor*) goes to
devices never seen before, picked at random; the rest goes to explored devices ranked by

    score = utility' + alpha * sqrt(0.1 * ln(round) / last_round)        (statistical utility + staleness)
    score *= (preferred_duration / duration) ** round_penalty            (only when slower than preferred)

where ``utility'`` is the device's last reported statistical utility (|B| * sqrt(mean loss^2)), clipped at
the ``clip_bound`` quantile and scaled to [0, 1], so that one outlier neither dominates nor squashes the
rest and ``alpha`` weighs staleness against a known scale. Among the explored devices whose score is at
least ``cut_off_util`` times the score of the last device that would make the cut, the exploitation
share is drawn with probability proportional to score (without replacement), as Oort does, so that
near-ties do not always favour the same devices.

The *pacer* sets ``preferred_duration``: the ``round_threshold`` percentile of the devices' last task
durations. When the statistical utility the selection collects stops improving, the pacer relaxes the
percentile by ``pacer_delta`` points (towards 100, where nothing is penalised), admitting slower devices
that may hold useful data. The paper phrases this as T <- T + delta; moving along the percentile keeps
``pacer_delta`` meaningful whatever the fleet's speed (FedScale's sampler does the same).

Everything the algorithm remembers between rounds lives in :class:`OortState`, which the daemon persists
in the job record; the per-device :class:`DeviceStats` are kept by the caller and updated with
:func:`update_stats` as results arrive.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# Weights of the proportional draw must be positive; a device whose score is 0 (lowest utility in
# round 1, where the staleness term is ln(1) = 0) still gets a tiny chance.
_MIN_WEIGHT = 1e-9


class OortConfig(Protocol):
    """What :func:`select_oort` reads its keys from: a :class:`~fedscaled.core.config.JobConfig` or a dict."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass
class DeviceStats:
    """What Oort knows about one explored device."""

    utility: float  # statistical utility last reported: |B| * sqrt(mean loss^2) (daemon falls back to loss * samples)
    duration: float  # seconds its last task took
    last_round: int  # round it last participated in
    count: int  # times it participated (results recorded)

    def to_record(self) -> dict[str, Any]:
        """JSON form for the store."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DeviceStats:
        """Inverse of :meth:`to_record`."""
        return cls(utility=float(record["utility"]), duration=float(record["duration"]),
                   last_round=int(record["last_round"]), count=int(record["count"]))


@dataclass
class OortState:
    """What Oort remembers between rounds (persisted in the job record)."""

    exploration: float  # current exploration factor
    threshold: float  # current duration percentile (starts at round_threshold; the pacer raises it)
    preferred_duration: float | None = None  # seconds; None: no duration known yet, or no penalty (percentile 100)
    utility_history: list[float] = field(default_factory=list)  # per round: utility the exploitation collected
    blacklist: list[str] = field(default_factory=list)  # devices skipped by exploitation (used too often)
    last_round: int = 0  # round of the last selection (a retried round must not decay or pace twice)

    @classmethod
    def initial(cls, config: OortConfig) -> OortState:
        """The state before the first round of a job."""
        return cls(exploration=float(config["exploration_factor"]), threshold=float(config["round_threshold"]))

    def to_record(self) -> dict[str, Any]:
        """JSON form for the job record (no infinities: an unset duration is None)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> OortState:
        """Inverse of :meth:`to_record`."""
        preferred = record.get("preferred_duration")
        return cls(exploration=float(record["exploration"]), threshold=float(record["threshold"]),
                   preferred_duration=None if preferred is None else float(preferred),
                   utility_history=[float(u) for u in record.get("utility_history", [])],
                   blacklist=[str(d) for d in record.get("blacklist", [])],
                   last_round=int(record.get("last_round", 0)))


def update_stats(stats: Mapping[str, DeviceStats], device_id: str, utility: float, duration: float,
                 round_number: int) -> DeviceStats:
    """The device's new record after a result in ``round_number`` (``stats`` itself is not changed).

    Non-finite or negative values (a buggy or hostile device) are stored as 0 so that they can
    neither poison the normalisation nor win the ranking.
    """
    previous = stats.get(device_id)
    return DeviceStats(utility=_clean(utility), duration=_clean(duration), last_round=int(round_number),
                       count=(previous.count if previous is not None else 0) + 1)


def select_oort(pool: list[str], count: int, stats: Mapping[str, DeviceStats], state: OortState,
                round_number: int, config: OortConfig, seed: int) -> tuple[list[str], OortState]:
    """Choose ``count`` devices from ``pool`` (devices checked in now) the Oort way.

    Returns the chosen devices (sorted, no duplicates, ``min(count, len(set(pool)))`` of them) and the
    state for the next round; ``state`` itself is not changed. Deterministic for a given seed and
    inputs. Exploration covers about ``exploration * count`` devices absent from ``stats``; when fewer
    unexplored devices are checked in, exploitation takes the rest, and vice versa. Blacklisted
    devices are only picked when nothing else is left, since a round needs its devices.
    """
    devices = sorted(set(pool))
    wanted = max(0, min(int(count), len(devices)))
    rng = random.Random(seed)
    advancing = round_number > state.last_round

    blacklist = _blacklist(stats, config)
    banned = set(blacklist)
    unexplored = [d for d in devices if d not in stats]
    explored = [d for d in devices if d in stats and d not in banned]
    threshold = state.threshold
    preferred = _percentile([s.duration for s in stats.values() if s.duration > 0], threshold)

    n_explore = min(len(unexplored), round(state.exploration * wanted))
    n_exploit = min(wanted - n_explore, len(explored))
    n_explore = min(len(unexplored), wanted - n_exploit)  # exploitation short of devices: explore more

    scores = _scores(explored, stats, round_number, preferred, config)
    exploited = _exploit(explored, scores, n_exploit, float(config["cut_off_util"]), rng)
    explored_now = rng.sample(unexplored, n_explore)
    chosen = set(exploited) | set(explored_now)
    if len(chosen) < wanted:
        # Only blacklisted devices remain: least used first, then by id (deterministic).
        spare = sorted((d for d in devices if d in banned), key=lambda d: (stats[d].count, d))
        chosen.update(spare[:wanted - len(chosen)])

    clip = _norm(stats, config, round_number)[0]
    collected = sum(min(stats[d].utility, clip) for d in exploited)
    history = list(state.utility_history)
    if advancing or not history:
        history.append(collected)
    else:
        history[-1] = collected  # a retried round replaces its own entry
    step = max(1, int(config["pacer_step"]))
    if advancing:
        threshold = _pace(history, threshold, round_number, step, float(config["pacer_delta"]))
        preferred = _percentile([s.duration for s in stats.values() if s.duration > 0], threshold)
    exploration = state.exploration
    if advancing:
        exploration = max(exploration * float(config["exploration_decay"]), float(config["exploration_min"]))
    new_state = OortState(exploration=exploration, threshold=threshold,
                          preferred_duration=None if math.isinf(preferred) else preferred,
                          utility_history=history[-2 * step:], blacklist=blacklist,
                          last_round=max(state.last_round, round_number))
    return sorted(chosen), new_state


def _clean(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) and value > 0 else 0.0


def _percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile; +inf (no bound) for an empty list or percent >= 100."""
    if not values or percent >= 100:
        return math.inf
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * percent / 100), len(ordered) - 1)]


def _recent(stats: Mapping[str, DeviceStats], config: OortConfig, round_number: int) -> list[float]:
    """Utilities that set the scale: those reported in the last ``sample_window`` rounds (all when none),
    so that reports from a long-gone model do not stretch the range."""
    window = float(config["sample_window"])
    recent = [s.utility for s in stats.values() if window > 0 and round_number - s.last_round <= window]
    return recent or [s.utility for s in stats.values()]


def _norm(stats: Mapping[str, DeviceStats], config: OortConfig, round_number: int) -> tuple[float, float]:
    """(clip value, lowest utility) of the recent utilities; the clip value is the ``clip_bound`` quantile."""
    utilities = sorted(_recent(stats, config, round_number))
    if not utilities:
        return 0.0, 0.0
    clip = utilities[min(int(len(utilities) * float(config["clip_bound"])), len(utilities) - 1)]
    return clip, min(utilities[0], clip)


def _scores(explored: list[str], stats: Mapping[str, DeviceStats], round_number: int, preferred: float,
            config: OortConfig) -> dict[str, float]:
    """Oort's exploitation score of each explored device."""
    clip, low = _norm(stats, config, round_number)
    span = clip - low
    alpha = float(config["exploration_alpha"])
    penalty = float(config["round_penalty"])
    log_round = math.log(max(1, round_number))
    scores: dict[str, float] = {}
    for device in explored:
        s = stats[device]
        # Scale to [0, 1] so that alpha weighs staleness against a fixed range; all equal: neutral 1.
        utility = (min(s.utility, clip) - low) / span if span > 0 else 1.0
        # Devices that last took part long ago (small last_round) get a larger bonus: their utility is stale.
        staleness = alpha * math.sqrt(0.1 * log_round / max(1, s.last_round))
        score = utility + staleness
        if s.duration > preferred:
            score *= (preferred / s.duration) ** penalty
        scores[device] = score
    return scores


def _exploit(explored: list[str], scores: Mapping[str, float], n: int, cut_off_util: float,
             rng: random.Random) -> list[str]:
    """``n`` devices drawn by score among those admitted by the cut-off."""
    if n <= 0:
        return []
    ranked = sorted(explored, key=lambda d: (-scores[d], d))
    cut_off = scores[ranked[n - 1]] * cut_off_util
    # The top n are always admitted: with a negative score (or NaN) at rank n, "score >= score * cut_off_util"
    # could otherwise reject rank n itself and the round would get fewer devices than asked (Hypothesis
    # found 6 of 7 chosen from 8 explored devices).
    admitted = ranked[:n] + [d for d in ranked[n:] if scores[d] >= cut_off]
    # Weighted sampling without replacement (Efraimidis-Spirakis): key u ** (1 / w), take the n largest.
    keyed = sorted(admitted, key=lambda d: (-(rng.random() ** (1.0 / max(scores[d], _MIN_WEIGHT))), d))
    return keyed[:n]


def _pace(history: list[float], threshold: float, round_number: int, step: int, delta: float) -> float:
    """Every ``step`` rounds, relax the duration percentile by ``delta`` when the utility collected over the
    last ``step`` rounds is no larger than over the ``step`` rounds before (the paper's "utility stops
    improving": admit slower devices)."""
    if round_number % step != 0 or len(history) < 2 * step:
        return threshold
    current = sum(history[-step:])
    before = sum(history[-2 * step:-step])
    return min(100.0, threshold + delta) if current <= before else threshold


def _blacklist(stats: Mapping[str, DeviceStats], config: OortConfig) -> list[str]:
    """Devices that took part more than ``blacklist_rounds`` times, most used first, at most
    ``blacklist_max_len`` of the explored devices (Oort's guard against over-fitting to a few devices)."""
    limit_rounds = int(config["blacklist_rounds"])
    if limit_rounds <= 0:
        return []
    over = sorted((d for d, s in stats.items() if s.count > limit_rounds), key=lambda d: (-stats[d].count, d))
    return sorted(over[:int(float(config["blacklist_max_len"]) * len(stats))])
