"""q-FedAvg: fair resource allocation, weighting devices with a higher loss more (``qfed_q``)."""

from __future__ import annotations

from collections.abc import Mapping

import jax

from fedscaled.core.strategies.base import ServerStrategy

# A device reporting a zero loss would make F^(q-1) infinite for q < 1.
MIN_LOSS = 1e-10


class QFedAvg(ServerStrategy):
    """Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020 (Algorithm 2).

    With L = 1 / (device learning rate), device k's loss F_k and update Δw_k = L (w - w_k):
    Δ_k = F_k^q Δw_k and h_k = q F_k^(q-1) ||Δw_k||^2 + L F_k^q, and the new model is
    w - Σ Δ_k / Σ h_k. Streamed: each upload is folded with weight F_k^q, so the running mean m gives
    Σ Δ_k = L (Σ F_k^q) (w - m), and Σ h_k is kept as a scalar. With q = 0 it is the plain mean.
    """

    name = "q-fedavg"
    paper = "Li et al., ICLR 2020"
    keys = ("qfed_q",)
    needs_delta_norm = True
    mean_based = False

    def fold_weight(self, weight: float, loss: float) -> float:
        """F_k^q: the sample count does not enter q-FedAvg's weights."""
        return float(max(loss, MIN_LOSS) ** float(self.values["qfed_q"]))

    def fold_extras(self, fold_weight: float, loss: float, delta_sq_norm: float, learning_rate: float
                    ) -> dict[str, float]:
        """h_k (with L = 1 / learning rate) and L F_k^q, summed over the round."""
        q = float(self.values["qfed_q"])
        inv_lr = 1.0 / learning_rate
        f = max(loss, MIN_LOSS)
        h = q * f ** (q - 1.0) * inv_lr * inv_lr * delta_sq_norm + inv_lr * fold_weight
        return {"qfed_h": h, "qfed_lf": inv_lr * fold_weight}

    def combine(self, mean: jax.Array, global_model: jax.Array, sums: Mapping[str, float], total_weight: float
                ) -> jax.Array:
        """w - L (Σ F^q) (w - m) / Σ h."""
        h = sums.get("qfed_h", 0.0)
        if h <= 0:
            return mean
        scale = sums.get("qfed_lf", 0.0) / h
        return global_model - scale * (global_model - mean)
