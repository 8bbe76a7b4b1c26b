"""Prometheus metrics of one daemon (its own registry, so that tests can run several daemons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.checkins = Counter("fedscaled_checkins", "Device check-ins by answer", ["job", "action"],
                                registry=self.registry)
        self.uploads = Counter("fedscaled_uploads", "Training uploads by outcome (accepted, duplicate or an "
                               "error code)", ["job", "outcome"], registry=self.registry)
        self.results = Counter("fedscaled_test_results", "Test results by outcome", ["job", "outcome"],
                               registry=self.registry)
        self.upload_bytes = Counter("fedscaled_upload_bytes", "Bytes of accepted uploads", ["job"],
                                    registry=self.registry)
        self.rounds = Counter("fedscaled_phases_closed", "Phases closed by kind and outcome",
                              ["job", "kind", "outcome"], registry=self.registry)
        self.pool = Gauge("fedscaled_waiting_devices", "Devices waiting in a job's selection pool", ["job"],
                          registry=self.registry)
        self.round = Gauge("fedscaled_round", "Current round of a job", ["job"], registry=self.registry)
        self.accuracy = Gauge("fedscaled_test_accuracy", "Latest test accuracy of a job", ["job"],
                              registry=self.registry)
        self.ingest_seconds = Histogram("fedscaled_upload_seconds", "Upload handling time: decode, durable "
                                        "write and fold", registry=self.registry,
                                        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.close_seconds = Histogram("fedscaled_round_close_seconds", "Time from the last accepted update "
                                       "to the new model being downloadable", registry=self.registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

        self.store_free = Gauge("fedscaled_store_free_bytes", "Free bytes on the store's file system",
                                registry=self.registry)
        self.store_full = Gauge("fedscaled_store_full", "1 while store writes fail for lack of disk space",
                                registry=self.registry)
        self.body_pool_free = Gauge("fedscaled_body_pool_free_bytes", "Upload receive buffers kept for reuse "
                                    "(given back after 60 s without uploads)", registry=self.registry)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return bytes(generate_latest(self.registry))
