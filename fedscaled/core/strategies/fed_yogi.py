"""FedYogi: Yogi on the server, over the round's pseudo-gradient (FedScale's ``yogi_*`` keys)."""

from __future__ import annotations

import optax

from fedscaled.core.strategies.base import ServerStrategy


class FedYogi(ServerStrategy):
    """Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2, Yogi)."""

    name = "fed-yogi"
    paper = "Reddi et al., ICLR 2021"
    keys = ("yogi_eta", "yogi_tau", "yogi_beta", "yogi_beta2")

    def optimizer(self) -> optax.GradientTransformation:
        """optax's Yogi: learning rate yogi_eta, moments yogi_beta and yogi_beta2, adaptivity yogi_tau."""
        v = self.values
        return optax.yogi(float(v["yogi_eta"]), b1=float(v["yogi_beta"]), b2=float(v["yogi_beta2"]),
                          eps=float(v["yogi_tau"]))
