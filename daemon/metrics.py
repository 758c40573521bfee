"""Prometheus metrics of the daemon, fed by the runner's listener callbacks."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds to store and checkpoint one batch: milliseconds for a few messages,
# seconds for 500 with a slow MongoDB.
BATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per daemon (tests run several in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("commsync_records_captured", "Records stored, by source and channel.", ["source", "channel"], registry=r)
        self.batch_seconds = Histogram(
            "commsync_batch_seconds", "Time to store and checkpoint one batch.", ["source"], buckets=BATCH_BUCKETS, registry=r
        )
        self.errors = Counter("commsync_source_errors", "Failed passes over a source.", ["source"], registry=r)
        self.last_success = Gauge(
            "commsync_last_success_timestamp_seconds", "When a pass over the source last completed (Unix time).", ["source"], registry=r
        )
        self.failing = Gauge("commsync_source_consecutive_failures", "Failed passes in a row (0: healthy).", ["source"], registry=r)
        self.backlog = Gauge("commsync_source_backlog", "Items found but not yet stored, when the source knows.", ["source"], registry=r)
        self.sources = Gauge("commsync_sources_owned", "Sources this instance works now (holds the lease of).", registry=r)

    # -- runner listener callbacks ----------------------------------------------------

    def batch_stored(self, source: str, batch: Any, seconds: float) -> None:
        self.batch_seconds.labels(source).observe(seconds)
        for channel, n in Tally(str(r.get("channel", "unknown")) for r in batch.records).items():
            self.records.labels(source, channel).inc(n)

    def pass_succeeded(self, status: Any) -> None:
        self.failing.labels(status.name).set(0)
        self.backlog.labels(status.name).set(0)
        if status.last_success is not None:
            self.last_success.labels(status.name).set(status.last_success.timestamp())

    def pass_failed(self, status: Any) -> None:
        self.errors.labels(status.name).inc()
        self.failing.labels(status.name).set(status.failures)

    def source_removed(self, name: str) -> None:
        for gauge in (self.failing, self.backlog, self.last_success):
            try:
                gauge.remove(name)
            except KeyError:
                pass

    def render(self, runner: Any = None) -> bytes:
        """The exposition text; gauges that mirror the runner's state are read now."""
        if runner is not None:
            for name, status in list(runner.status.items()):
                if status.backlog is not None:
                    self.backlog.labels(name).set(status.backlog)
            held = getattr(runner.leases, "held", None)
            self.sources.set(len(held) if held is not None else len(runner.status))
        return generate_latest(self.registry)
