"""The selector seam: which waiting devices a round picks. Pure logic, no I/O.

A selector takes the pool of eligible devices that are checked in now, how many to pick, what the
daemon knows of each device (:class:`~fedscaled.core.oort.DeviceStats`), the selector's own persisted
state (a JSON-able dict, stored in the job record between rounds; None before the first round), the
round number and a seed, and returns the chosen devices (sorted) and its new state. Deterministic for a
seed. ``sample_mode`` names the selector: add one with a class here and a line in ``SELECTORS``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from fedscaled.core import rounds
from fedscaled.core.oort import DeviceStats, OortState, select_oort


class Selector(Protocol):
    """Chooses a round's participants."""

    #: whether the selector reads device statistics (the engine keeps them only when one does)
    uses_stats: ClassVar[bool]

    def select(self, pool: list[str], count: int, stats: Mapping[str, DeviceStats], state: dict[str, Any] | None,
               round_number: int, seed: int) -> tuple[list[str], dict[str, Any] | None]:
        """The chosen devices (sorted, at most ``count``) and the state to persist."""
        ...


class RandomSelector:
    """A uniform random sample of the waiting pool (FedScale's default ``sample_mode: random``)."""

    uses_stats: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        del config

    def select(self, pool: list[str], count: int, stats: Mapping[str, DeviceStats], state: dict[str, Any] | None,
               round_number: int, seed: int) -> tuple[list[str], dict[str, Any] | None]:
        """``count`` devices uniformly at random (all of them when the pool is smaller); no state."""
        return rounds.select(pool, count, seed), None


class OortSelector:
    """Oort's guided selection (Lai et al., OSDI 2021); see :mod:`fedscaled.core.oort`."""

    uses_stats: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    def select(self, pool: list[str], count: int, stats: Mapping[str, DeviceStats], state: dict[str, Any] | None,
               round_number: int, seed: int) -> tuple[list[str], dict[str, Any] | None]:
        """Oort's choice; the state is its exploration factor, pacer and blacklist."""
        current = OortState.from_record(state) if state else OortState.initial(self.config)
        chosen, new_state = select_oort(pool, count, stats, current, round_number, self.config, seed)
        return chosen, new_state.to_record()


SELECTORS: dict[str, type[RandomSelector] | type[OortSelector]] = {
    "random": RandomSelector,
    "oort": OortSelector,
}


def selector_for(config: Any) -> Selector:
    """The selector a job's ``sample_mode`` names."""
    selector: Selector = SELECTORS[str(config["sample_mode"])](config)
    return selector
