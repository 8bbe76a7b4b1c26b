"""The round state machine of a synchronous job: pure logic, no I/O, time passed in.

A job advances through *phases*. A phase hands one kind of task (``train`` or ``test``) for one model
version to devices selected from the pool of devices that are checked in and waiting. It closes when
``target`` results are in, or at its deadline; at the deadline it *counts* if at least ``quorum``
results are in, else a training round is retried or the job fails (``on_low_quorum``).

The engine in :mod:`fedscaled.jobs.engine` owns the I/O: it persists every change this module makes
and answers devices.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from fedscaled.core.config import JobConfig

TRAIN = "train"
TEST = "test"


@dataclass(frozen=True)
class DeviceStatus:
    """What a device reports at check-in."""

    battery: int
    charging: bool
    idle: bool
    unmetered: bool
    free_storage_mb: int
    num_samples: int
    backends: tuple[str, ...]


def ineligible_reason(config: JobConfig, status: DeviceStatus, kind: str = TRAIN) -> str | None:
    """Why the device may not take a task now (None when eligible).

    The state policy (charging, idle, unmetered network, battery floor) protects the phone's user;
    ``filter_less``/``filter_more`` bound the local sample count as in FedScale (training only).
    """
    if config["require_charging"] and not status.charging:
        return "not charging"
    if config["require_unmetered"] and not status.unmetered:
        return "metered network"
    if config["require_idle"] and not status.idle:
        return "not idle"
    if status.battery < config["min_battery"]:
        return f"battery below {config['min_battery']}%"
    if kind == TRAIN and status.num_samples < config["filter_less"]:
        return f"fewer than {config['filter_less']} samples"
    if kind == TRAIN and status.num_samples > config["filter_more"]:
        return f"more than {config['filter_more']} samples"
    if status.num_samples < 1:
        return "no local samples"
    return None


def learning_rate(config: JobConfig, round_number: int) -> float:
    """FedScale's step decay: times ``decay_factor`` every ``decay_round`` rounds, floored at min_learning_rate."""
    every = max(1, int(config["decay_round"]))
    decays = max(0, round_number - 1) // every
    return float(max(config["learning_rate"] * config["decay_factor"] ** decays, config["min_learning_rate"]))


def select(pool: list[str], count: int, seed: int) -> list[str]:
    """Uniform random sample of ``count`` devices from the waiting pool (deterministic for a seed)."""
    ordered = sorted(pool)
    if count >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, count))


@dataclass
class Task:
    """One device's assignment in a phase."""

    task_id: str
    device_id: str
    phase_id: int
    kind: str
    round: int
    model_version: int
    issued_at: float
    deadline: float
    device_samples: int = 0  # samples the device reported when selected: caps its FedAvg weight
    done: bool = False
    abandoned: bool = False  # the device gave the task up (it will not deliver a result)
    result: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """JSON form for the store."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Task:
        """Inverse of :meth:`to_record`."""
        return cls(**record)


@dataclass
class Phase:
    """An open selection: tasks of one kind for one model version."""

    phase_id: int
    kind: str
    round: int
    attempt: int
    model_version: int
    opened_at: float
    deadline: float
    target: int
    quorum: int
    planned: int
    task_ids: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """JSON form for the job record."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Phase:
        """Inverse of :meth:`to_record`."""
        return cls(**record)


@dataclass(frozen=True)
class Plan:
    """What the job does next: open a phase of ``kind`` for ``round`` on ``model_version``, or finish."""

    kind: str  # train | test | finish
    round: int
    model_version: int


def next_plan(config: JobConfig, completed_rounds: int, tested_version: int | None) -> Plan:
    """The next step after ``completed_rounds`` training rounds.

    The initial model is evaluated before round 1, then the model after every ``eval_interval``-th
    round and after the last round; ``tested_version`` is the newest version already evaluated
    (or given up on).
    """
    rounds = int(config["rounds"])
    due = completed_rounds == 0 or completed_rounds % int(config["eval_interval"]) == 0 or completed_rounds == rounds
    if due and (tested_version is None or tested_version < completed_rounds):
        return Plan(TEST, max(1, completed_rounds), completed_rounds)
    if completed_rounds >= rounds:
        return Plan("finish", completed_rounds, completed_rounds)
    return Plan(TRAIN, completed_rounds + 1, completed_rounds)


def phase_sizes(config: JobConfig, kind: str) -> tuple[int, int, int]:
    """(devices to select, results wanted, quorum) for a phase of ``kind``."""
    if kind == TRAIN:
        target = int(config["num_participants"])
        return config.selected_per_round, target, config.min_participants
    target = int(config["test_participants"]) or int(config["num_participants"])
    planned = max(target, int(target * config["overcommitment"]))
    return planned, target, 1


def should_open(config: JobConfig, pool_size: int, oldest_wait: float, kind: str) -> bool:
    """Open the phase when the pool holds everyone it would select, or after the selection window
    when it holds at least the quorum."""
    planned, _, quorum = phase_sizes(config, kind)
    if pool_size >= planned:
        return True
    return pool_size >= quorum and oldest_wait >= config["selection_window"]


def retry_window(config: JobConfig, busy_for: float | None = None) -> dict[str, float]:
    """A window the device picks its next check-in from (spreads the fleet's return).

    ``busy_for``: seconds until the current phase's deadline, when known, so that devices not selected
    come back around the time the next selection is likely.
    """
    low, high = float(config["retry_min"]), float(config["retry_max"])
    if busy_for is not None and busy_for > 0:
        high = min(high, max(low, busy_for))
    return {"min": round(low, 3), "max": round(max(low, high), 3)}


def fedscale_round_line(round_number: int, wall_clock: float, planned: int, succeeded: int,
                        loss: float | None) -> str:
    """The round line in FedScale's wording, so existing log parsers keep working."""
    loss_text = f"{loss:.4f}" if loss is not None and math.isfinite(loss) else "nan"
    return (f"Wall clock: {round(wall_clock)} s, round: {round_number}, Planned participants: {planned}, "
            f"Succeed participants: {succeeded}, Training loss: {loss_text}")


def fedscale_test_line(round_number: int, wall_clock: float, results: dict[str, float]) -> str:
    """The testing line in FedScale's wording."""
    shown = {"round": round_number, "clock": round(wall_clock, 1), "top_1": round(results["top_1"], 4),
             "top_5": round(results["top_5"], 4), "loss": round(results["loss"], 4),
             "test_len": int(results["test_len"])}
    return f"FL Testing in round: {round_number}, virtual_clock: {round(wall_clock, 1)}, results: {shown}"


def merge_test_results(results: list[dict[str, Any]]) -> dict[str, float] | None:
    """Test metrics over device results, each device weighted by its sample count within bounds.

    A device's weight is its ``samples``, capped at ``max_samples`` (what it reported holding when it was
    selected, when known) and then at the round's median weight. Devices with at most the median count are
    weighted by their samples as in FedScale; larger ones count as the median, so that one device claiming
    10^15 samples moves the round's metric by no more than one device's share. Rates are per-device rates
    (correct / samples) averaged with those weights; ``test_len`` is the total weight.
    """
    capped = [float(min(int(r["samples"]), int(r.get("max_samples") or r["samples"]))) for r in results]
    capped = [w for w in capped if w > 0]
    if not capped:
        return None
    ordered = sorted(capped)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    total = top1 = top5 = loss = 0.0
    for r in results:
        samples = int(r["samples"])
        if samples <= 0:
            continue
        weight = min(float(samples), float(int(r.get("max_samples") or samples)), median)
        total += weight
        top1 += weight * int(r["correct_top1"]) / samples
        top5 += weight * int(r["correct_top5"]) / samples
        loss += weight * float(r["loss_sum"]) / samples
    return {"top_1": top1 / total, "top_5": top5 / total, "loss": loss / total, "test_len": total}
