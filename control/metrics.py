"""Prometheus metrics of the control node, on an explicit registry.

Names follow DESIGN §6 (``anywan_<component>_<thing>_<unit>``). Labels are
bounded: API routes are the route *templates* (``/accounts/{account_id}/…``),
never raw paths; per-account series are capped at ``max_accounts`` distinct
accounts, the rest counted under ``account="_other"`` (issue 10). No metric
carries a key, PSK or token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

OTHER_ACCOUNT = "_other"


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, max_accounts: int = 500):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.max_accounts = max_accounts
        self._accounts: set[str] = set()
        self._before_render: list[Callable[[], None]] = []
        self.api_requests = Counter(
            "anywan_control_api_requests",
            "REST API requests by route template, method and HTTP status",
            ["route", "method", "status"],
            registry=r,
        )
        self.tunnels = Gauge(
            "anywan_control_tunnels", "Configured tunnels by kind", ["kind"], registry=r
        )
        self.routes = Gauge("anywan_control_routes", "Configured static routes", registry=r)
        self.account_tunnels = Gauge(
            "anywan_control_account_tunnels",
            "Configured tunnels per account (at most max_accounts accounts, then _other)",
            ["account", "kind"],
            registry=r,
        )
        self.account_sas = Gauge(
            "anywan_control_account_sas",
            "Established IKE SAs and installed Child SA pairs per account (bounded like above)",
            ["account", "kind"],
            registry=r,
        )
        # Registered here, driven by the IKE glue in control/service.py.
        self.ike_sas = Gauge("anywan_control_ike_sas", "IKE SAs by state", ["state"], registry=r)
        self.child_sas = Gauge(
            "anywan_control_child_sas", "Child SAs by state", ["state"], registry=r
        )
        self.handshakes = Counter(
            "anywan_control_ike_handshakes",
            "IKE_SA_INIT/IKE_AUTH handshakes by result",
            ["result"],
            registry=r,
        )
        self.rekeys = Counter(
            "anywan_control_child_sa_rekeys", "Child SA rekeys by result", ["result"], registry=r
        )
        self.deletes = Counter(
            "anywan_control_sa_deletes", "IKE/Child SA deletions by kind", ["kind"], registry=r
        )
        self.dpd_failures = Counter(
            "anywan_control_dpd_failures", "IKE SAs declared dead by DPD", registry=r
        )
        self.auth_failures = Counter(
            "anywan_control_ike_auth_failures",
            "IKE authentication failures by reason",
            ["reason"],
            registry=r,
        )
        self.answer_hold_timeouts = Counter(
            "anywan_control_ike_answer_hold_timeouts",
            "IKE messages telling the peer about a new Child SA that were sent before "
            "every worker acknowledged the SA (after waiting the bound of 0.5 s)",
            registry=r,
        )
        self.make_before_break_timeouts = Counter(
            "anywan_control_rekey_apply_timeouts",
            "Rekeys whose new SA was not acknowledged by every worker in time",
            registry=r,
        )
        self.ike_state_writes = Counter(
            "anywan_control_ike_state_writes",
            "Sealed per-IKE-SA state rows written (put) or removed (delete)",
            ["op"],
            registry=r,
        )
        # Bus state, read from the publisher at scrape time.
        self.bus_sequence = Gauge(
            "anywan_control_bus_sequence", "Last sequence number published on the bus", registry=r
        )
        self.bus_workers = Gauge(
            "anywan_control_bus_workers", "Workers currently subscribed to the bus", registry=r
        )
        self.bus_slowest_lag = Gauge(
            "anywan_control_bus_slowest_worker_lag_updates",
            "Updates the slowest live worker has not yet acknowledged",
            registry=r,
        )
        self.live_workers_published = Gauge(
            "anywan_control_live_worker_records",
            "worker/<node>/<index> records on the bus (live workers with a handoff "
            "address: the owner election set of replay-protected SAs)",
            registry=r,
        )

    def account_label(self, account_id: str) -> str:
        if account_id in self._accounts:
            return account_id
        if len(self._accounts) < self.max_accounts:
            self._accounts.add(account_id)
            return account_id
        return OTHER_ACCOUNT

    def bind_bus(
        self, sequence: Callable[[], float], workers: Callable[[], float], lag: Callable[[], float]
    ) -> None:
        self.bus_sequence.set_function(sequence)
        self.bus_workers.set_function(workers)
        self.bus_slowest_lag.set_function(lag)

    def bind_ike_drops(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Export the IKE engine's drop counts (``engine.drops``: a fixed set of
        trigger names, so the label set is bounded) as
        ``anywan_control_ike_dropped_messages_total{reason}``, read at scrape."""
        self.registry.register(_IkeDropsCollector(source))

    def refresh_on_render(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` before each :meth:`render`: for gauges that cost a pass over
        every record, computed per scrape rather than per event."""
        self._before_render.append(fn)

    def render(self) -> bytes:
        for fn in self._before_render:
            fn()
        return generate_latest(self.registry)


class _IkeDropsCollector:
    """Reads the engine's own counter at scrape time: the engine stays free of
    prometheus_client (sans-IO) and nothing is counted twice."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self.source = source

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "anywan_control_ike_dropped_messages",
            "IKE messages the engine dropped or refused, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self.source().items()):
            family.add_metric([reason], count)
        yield family
