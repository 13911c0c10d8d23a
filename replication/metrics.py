"""Prometheus metrics of the bus, ``anywan_bus_*``.

Each bus object takes a :class:`prometheus_client.CollectorRegistry`; the
default is a fresh private registry, so several publishers or subscribers in
one process (tests, a forwarder) never collide. Pass
``prometheus_client.REGISTRY`` (or the process's registry) to export them.
Publisher-side and subscriber-side names differ, so a forwarder can put both
halves in one registry. Labels are bounded enums (reasons, directions); no
key, worker id or record content is ever a label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

RESNAPSHOT_REASONS = (
    "start",
    "epoch",
    "gap",
    "heartbeat",
    "snapshot_timeout",
    "incomplete",
    "overflow",
)
REJECT_REASONS = ("malformed", "version", "invalid", "key_mismatch", "frame")


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sequence = Gauge(
            "anywan_bus_sequence", "Last sequence number published on the bus", registry=r
        )
        self.records = Gauge(
            "anywan_bus_published_records", "Records held by the publisher", registry=r
        )
        self.updates = Counter(
            "anywan_bus_updates_published", "Sequenced updates published", registry=r
        )
        self.snapshots_served = Counter(
            "anywan_bus_snapshots_served", "Snapshots sent to subscribers", registry=r
        )
        self.live_subscribers = Gauge(
            "anywan_bus_live_subscribers", "Subscribers that acknowledged recently", registry=r
        )
        self.max_lag = Gauge(
            "anywan_bus_max_lag_sequences",
            "Sequence numbers the slowest live subscriber is behind",
            registry=r,
        )
        self.reports = Counter(
            "anywan_bus_reports",
            "Subscriber reports received with acks, by result (ok, oversized, malformed)",
            ["result"],
            registry=r,
        )


class SubscriberMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.applied = Gauge(
            "anywan_bus_applied_sequence", "Last bus sequence applied locally", registry=r
        )
        self.lag = Gauge(
            "anywan_bus_lag_sequences",
            "Newest sequence seen on the stream minus the applied one",
            registry=r,
        )
        self.records = Gauge("anywan_bus_records", "Records in the local state", registry=r)
        self.snapshots_taken = Counter(
            "anywan_bus_snapshots_taken", "Snapshots received and installed", registry=r
        )
        self.resnapshots = Counter(
            "anywan_bus_snapshot_requests",
            "Snapshot requests, by why one was needed",
            ["reason"],
            registry=r,
        )
        self.gaps = Counter("anywan_bus_gaps", "Sequence gaps detected on the stream", registry=r)
        self.heartbeats_missed = Counter(
            "anywan_bus_heartbeats_missed",
            "Times the stream was silent past the heartbeat timeout",
            registry=r,
        )
        self.rejected = Counter(
            "anywan_bus_rejected_records",
            "Records or frames refused (never applied), by reason",
            ["reason"],
            registry=r,
        )
        self.callback_errors = Counter(
            "anywan_bus_callback_errors", "on_set/on_delete callbacks that raised", registry=r
        )
        for reason in RESNAPSHOT_REASONS:
            self.resnapshots.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.datagrams = Counter(
            "anywan_bus_relay_datagrams",
            "IKE datagrams relayed, by direction",
            ["direction"],
            registry=r,
        )
        self.dropped = Counter(
            "anywan_bus_relay_dropped",
            "IKE datagrams the relay could not deliver, by reason",
            ["reason"],
            registry=r,
        )
        self.live_workers = Gauge(
            "anywan_bus_relay_live_workers", "Relay clients heard from recently", registry=r
        )
        for d in ("to_control", "to_worker"):
            self.datagrams.labels(d)
        for reason in ("malformed", "no_worker", "queue_full"):
            self.dropped.labels(reason)
