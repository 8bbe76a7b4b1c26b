"""fedscaled: a federated-learning aggregation daemon for edge servers."""

__version__ = "0.1.0"
