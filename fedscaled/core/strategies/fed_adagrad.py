"""FedAdagrad: Adagrad on the server, over the round's pseudo-gradient."""

from __future__ import annotations

import optax

from fedscaled.core.strategies.base import ServerStrategy, server_lr

DEFAULT_LR = 0.1


class FedAdagrad(ServerStrategy):
    """Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, Adagrad)."""

    name = "fed-adagrad"
    paper = "Reddi et al., ICLR 2021"
    keys = ("server_lr", "server_tau")

    def optimizer(self) -> optax.GradientTransformation:
        """optax's Adagrad: server_lr (0: 0.1), adaptivity server_tau.

        The paper divides by sqrt(v) + tau with v starting at tau^2; optax's Adagrad adds its epsilon inside
        the root. With epsilon = tau^2 (and the accumulator starting at tau^2) the denominator
        sqrt(v + tau^2) lies between max(sqrt(v), tau) and the paper's sqrt(v) + tau, so the adaptivity
        floor is tau as in the paper.
        """
        v = self.values
        tau = float(v["server_tau"])
        return optax.adagrad(server_lr(v, DEFAULT_LR), initial_accumulator_value=tau * tau, eps=tau * tau)
