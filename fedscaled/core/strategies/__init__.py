"""Server strategies by ``gradient_policy`` name: the registry.

Add a strategy: a module in this package with a :class:`ServerStrategy` subclass, one line in
``STRATEGIES`` below, and one row in docs/config.md ("Strategies").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedscaled.core.strategies.base import ServerStrategy
from fedscaled.core.strategies.fed_adagrad import FedAdagrad
from fedscaled.core.strategies.fed_adam import FedAdam
from fedscaled.core.strategies.fed_avgm import FedAvgM
from fedscaled.core.strategies.fed_prox import FedProx
from fedscaled.core.strategies.fed_yogi import FedYogi
from fedscaled.core.strategies.fedavg import FedAvg
from fedscaled.core.strategies.q_fedavg import QFedAvg

STRATEGIES: dict[str, type[ServerStrategy]] = {
    "fed-avg": FedAvg,
    "fed-yogi": FedYogi,
    "fed-adam": FedAdam,
    "fed-adagrad": FedAdagrad,
    "fed-avgm": FedAvgM,
    "fed-prox": FedProx,
    "q-fedavg": QFedAvg,
}
# Other spellings FedScale's files and docs use.
ALIASES = {"fedavg": "fed-avg", "yogi": "fed-yogi", "prox": "fed-prox", "qfedavg": "q-fedavg"}
POLICY_NAMES: tuple[str, ...] = (*STRATEGIES, *ALIASES)


def canonical(policy: str) -> str:
    """The registry name of a ``gradient_policy`` value (aliases resolved)."""
    return ALIASES.get(policy, policy)


def strategy_for(values: Mapping[str, Any]) -> ServerStrategy:
    """The strategy a job's config values name."""
    return STRATEGIES[canonical(str(values["gradient_policy"]))](values)


__all__ = ["ALIASES", "POLICY_NAMES", "STRATEGIES", "ServerStrategy", "canonical", "strategy_for"]
