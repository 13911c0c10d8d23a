"""The worker's Prometheus metrics, ``anywan_worker_*``, flushed from local ints.

The packet loop never touches prometheus-client (DESIGN §7): it counts in
plain ints on its own objects (``Dataplane.drops``, ``TunnelEntry.packets_in``
...) and :meth:`WorkerMetrics.flush` adds the deltas every second or so.
Label sets are bounded: ``reason`` is the :class:`~dataplane.drops.DropReason`
enum; ``account`` and ``tunnel`` are configured objects (a deleted tunnel's
series are removed) and ``direction`` is ``in``/``out``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from .drops import DropReason

if TYPE_CHECKING:
    from .worker import Dataplane, Worker


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.drops = Counter(
            "anywan_worker_drops", "Packets dropped, by reason", ["reason"], registry=r
        )
        for reason in DropReason:
            self.drops.labels(reason.value)  # every reason visible from the start
        self.packets = Counter(
            "anywan_worker_tunnel_packets",
            "Inner packets carried per tunnel and direction",
            ["account", "tunnel", "direction"],
            registry=r,
        )
        self.bytes = Counter(
            "anywan_worker_tunnel_bytes",
            "Inner bytes carried per tunnel and direction",
            ["account", "tunnel", "direction"],
            registry=r,
        )
        self.ike_relayed = Counter(
            "anywan_worker_ike_relayed_packets",
            "IKE datagrams relayed, by direction (to_control / to_peer)",
            ["direction"],
            registry=r,
        )
        self.sas = Gauge("anywan_worker_sas", "Child SAs (both directions) installed", registry=r)
        self.tunnels = Gauge("anywan_worker_tunnels", "Tunnels known", registry=r)
        self.accounts = Gauge(
            "anywan_worker_accounts", "Accounts with an inner network on this worker", registry=r
        )
        self.peer_queues = Gauge(
            "anywan_worker_peer_tun_queues",
            "TUN queues of the node's other workers held here (to write a replay-protected "
            "tunnel's inbound packets into its owner's queue)",
            registry=r,
        )
        self.live_workers = Gauge(
            "anywan_worker_node_live_workers", "Workers alive on this node", registry=r
        )
        self.bus_pending = Gauge(
            "anywan_worker_bus_pending_records",
            "Bus records received but not yet applied by the packet loop (stays near 0; "
            "a value that only grows means the loop is not being woken for them)",
            registry=r,
        )
        self.records_rejected = Counter(
            "anywan_worker_records_rejected",
            "Bus records that could not be applied (e.g. unsupported cipher)",
            registry=r,
        )
        self.account_sync_failures = Counter(
            "anywan_worker_account_sync_failures",
            "Failed attempts to set up an account's TUN queue and routes (retried every 0.25 s)",
            registry=r,
        )
        self.tun_repairs = Counter(
            "anywan_worker_tun_repairs",
            "Account TUN routes put back after something outside anywan removed them "
            "(one per route; a TUN set down or lost notifications count one full re-sync)",
            registry=r,
        )
        self.handoffs = Counter(
            "anywan_worker_replay_handoff_packets",
            "Packets handed to the owner worker of a replay-protected SA",
            registry=r,
        )
        self._seen_handoffs = 0
        self._seen_drops: dict[DropReason, int] = {}
        self._seen_tunnels: dict[tuple[str, str], list[int]] = {}

    def flush(self, dp: Dataplane) -> None:
        """Add what the loop counted since the last flush."""
        for reason, n in dp.drops.items():
            delta = n - self._seen_drops.get(reason, 0)
            if delta:
                self.drops.labels(reason.value).inc(delta)
                self._seen_drops[reason] = n
        live: set[tuple[str, str]] = set()
        for entry in dp.sad.tunnels.values():
            rec = entry.record
            key = (rec.account_id, rec.tunnel_id)
            live.add(key)
            now = [entry.packets_in, entry.bytes_in, entry.packets_out, entry.bytes_out]
            seen = self._seen_tunnels.get(key, [0, 0, 0, 0])
            if now != seen:
                for i, (metric, direction) in enumerate(
                    (
                        (self.packets, "in"),
                        (self.bytes, "in"),
                        (self.packets, "out"),
                        (self.bytes, "out"),
                    )
                ):
                    if now[i] > seen[i]:
                        metric.labels(rec.account_id, rec.tunnel_id, direction).inc(
                            now[i] - seen[i]
                        )
                self._seen_tunnels[key] = now
        for key in [k for k in self._seen_tunnels if k not in live]:
            del self._seen_tunnels[key]
            for metric in (self.packets, self.bytes):
                for direction in ("in", "out"):
                    with contextlib.suppress(KeyError):
                        metric.remove(key[0], key[1], direction)
        if dp.handed_off > self._seen_handoffs:
            self.handoffs.inc(dp.handed_off - self._seen_handoffs)
            self._seen_handoffs = dp.handed_off
        self.sas.set(dp.sad.sa_count)
        self.tunnels.set(len(dp.sad.tunnels))
        self.accounts.set(len(dp.accounts))


_REMOTE_RESULTS = ("sent", "received", "rejected", "replayed")


class OwnerMetrics:
    """Prometheus side of the owner election and the replay checkpoints
    (plain ints on the worker, flushed with the other metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.remote = Counter(
            "anywan_worker_replay_remote_handoff_packets",
            "Cleartext of replay-protected SAs handed across nodes, by result "
            "(sent, received, rejected = not authentic under our handoff key, "
            "replayed = a copy of a datagram already sent on, dropped by the owner)",
            ["result"],
            registry=registry,
        )
        for r in _REMOTE_RESULTS:
            self.remote.labels(r)
        self.raised = Counter(
            "anywan_worker_replay_windows_raised",
            "Inbound replay windows raised to a replicated checkpoint (rwin/ records)",
            registry=registry,
        )
        self.members = Gauge(
            "anywan_worker_owner_election_members",
            "Workers in this worker's owner election for replay-protected SAs",
            ["scope"],
            registry=registry,
        )
        self._seen = [0, 0, 0, 0, 0]

    def flush(self, w: Worker) -> None:  # the worker's plain ints
        now = [
            w.remote_sent,
            w.remote_received,
            w.remote_rejected,
            w.remote_replayed,
            w.windows_raised,
        ]
        for i, label in enumerate(_REMOTE_RESULTS):
            if now[i] > self._seen[i]:
                self.remote.labels(label).inc(now[i] - self._seen[i])
        if now[4] > self._seen[4]:
            self.raised.inc(now[4] - self._seen[4])
        self._seen = now
        n = len(set(w.dp.live))
        self.members.labels("cluster").set(n if w.election == "cluster" else 0)
        self.members.labels("node").set(n if w.election == "node" else 0)
