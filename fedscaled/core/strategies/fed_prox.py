"""FedProx: devices add ``mu/2 * ||w - w_global||^2`` to their local loss; the server averages."""

from __future__ import annotations

from typing import Any

from fedscaled.core.strategies.base import ServerStrategy


class FedProx(ServerStrategy):
    """Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020."""

    name = "fed-prox"
    paper = "Li et al., MLSys 2020"
    keys = ("proxy_mu",)

    def task_config(self) -> dict[str, Any]:
        """Every training task carries ``proxy_mu``: the device pulls its weights toward the task's model."""
        return {"proxy_mu": float(self.values["proxy_mu"])}
