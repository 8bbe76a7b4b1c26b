"""FedAvgM: server momentum over the round's pseudo-gradient."""

from __future__ import annotations

import optax

from fedscaled.core.strategies.base import ServerStrategy, server_lr

DEFAULT_LR = 1.0


class FedAvgM(ServerStrategy):
    """Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019; Reddi et al., ICLR 2021."""

    name = "fed-avgm"
    paper = "Hsu et al., arXiv:1909.06335 (2019)"
    keys = ("server_lr", "server_momentum")

    def optimizer(self) -> optax.GradientTransformation:
        """optax's SGD with momentum server_momentum and learning rate server_lr (0: 1.0)."""
        v = self.values
        return optax.sgd(server_lr(v, DEFAULT_LR), momentum=float(v["server_momentum"]))
