"""FedAdam: Adam on the server, over the round's pseudo-gradient."""

from __future__ import annotations

import optax

from fedscaled.core.strategies.base import ServerStrategy, server_lr

DEFAULT_LR = 0.01


class FedAdam(ServerStrategy):
    """Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, Adam)."""

    name = "fed-adam"
    paper = "Reddi et al., ICLR 2021"
    keys = ("server_lr", "server_beta1", "server_beta2", "server_tau")

    def optimizer(self) -> optax.GradientTransformation:
        """optax's Adam: server_lr (0: 0.01), server_beta1, server_beta2, adaptivity server_tau."""
        v = self.values
        return optax.adam(server_lr(v, DEFAULT_LR), b1=float(v["server_beta1"]), b2=float(v["server_beta2"]),
                          eps=float(v["server_tau"]))
