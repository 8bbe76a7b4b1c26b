"""FedAvg: the new global model is the weighted mean of the round's uploads."""

from __future__ import annotations

from fedscaled.core.strategies.base import ServerStrategy


class FedAvg(ServerStrategy):
    """McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data"."""

    name = "fed-avg"
    paper = "McMahan et al., AISTATS 2017"
    keys = ("weighting",)
