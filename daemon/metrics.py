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
        # Registered once a lease keeper reports on it: without one, a constant 0 would read as "down".
        self.mongodb_up = Gauge("commsync_mongodb_up", "1 when MongoDB answered this instance's last lease round (every third of daemon.lease_ttl).", registry=None)
        self._mongodb_up_registered = False
        self.newest = Gauge(
            "commsync_newest_item_timestamp_seconds", "When the newest item captured from the source happened (Unix time).", ["source"], registry=r
        )
        self.parked = Gauge("commsync_source_parked", "1 while the source is parked (credentials refused for days).", ["source"], registry=r)
        self.refused = Gauge(
            "commsync_source_credentials_refused", "Logins refused in a row (0: the last attempt was not refused).", ["source"], registry=r
        )
        self.problems = Gauge("commsync_source_problems", "Problems the source reports without failing (a missing folder).", ["source"], registry=r)
        self.unowned = Gauge(
            "commsync_sources_unowned", "Configured sources no instance has worked for longer than a lease.", registry=r
        )
        self.verified = Gauge(
            "commsync_verified_through_timestamp_seconds", "When verify last compared the stream with the remote side (Unix time).",
            ["source", "stream"], registry=r,
        )
        self.missing = Gauge("commsync_verify_missing_items", "Items the last verify found missing.", ["source", "stream"], registry=r)
        self.quarantined = Gauge(
            "commsync_verify_quarantined_items", "Items the last verify found in quarantine.", ["source", "stream"], registry=r
        )

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
        for gauge in (self.failing, self.backlog, self.last_success, self.newest, self.parked, self.refused, self.problems):
            try:
                gauge.remove(name)
            except KeyError:
                pass
        for gauge in (self.verified, self.missing, self.quarantined):
            for labels in [k for k in gauge._metrics if k[0] == name]:
                gauge.remove(*labels)

    def render(self, runner: Any = None) -> bytes:
        """The exposition text; gauges that mirror the runner's state are read now."""
        if runner is not None:
            for name, status in list(runner.status.items()):
                if status.backlog is not None:
                    self.backlog.labels(name).set(status.backlog)
                if status.newest_item_at is not None:
                    self.newest.labels(name).set(status.newest_item_at.timestamp())
                self.parked.labels(name).set(1 if status.state == "parked" else 0)
                self.refused.labels(name).set(status.refusals)
                self.problems.labels(name).set(len(status.problems))
                for stream, counts in status.verified.items():
                    if counts.get("at") is not None:
                        self.verified.labels(name, stream).set(counts["at"].timestamp())
                    self.missing.labels(name, stream).set(counts.get("missing") or 0)
                    self.quarantined.labels(name, stream).set(counts.get("quarantined") or 0)
            held = getattr(runner.leases, "held", None)
            self.sources.set(len(held) if held is not None else len(runner.status))
            unowned = getattr(runner.leases, "unowned_for", None)
            self.unowned.set(len(unowned()) if unowned is not None else 0)
            # During a MongoDB outage sources stop trying once their leases lapse, so their
            # consecutive failures stay low: this is the gauge to alert on for the database.
            healthy = getattr(runner.leases, "healthy", None)
            if healthy is not None:
                if not self._mongodb_up_registered:
                    self.registry.register(self.mongodb_up)
                    self._mongodb_up_registered = True
                self.mongodb_up.set(1 if healthy else 0)
        return generate_latest(self.registry)
