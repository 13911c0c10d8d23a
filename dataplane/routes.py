"""Per-account static route tables: longest-prefix match, then ECMP.

Magic WAN's route table maps a prefix to a tunnel with a ``priority`` (lower
wins) and a ``weight``; equal-priority routes to the same prefix share traffic
(ECMP). Here each account has its own :class:`RouteTable` (issue 10: an
account is its own virtual network, so two accounts may both route
10.0.0.0/24 and an outbound lookup only ever sees its own account's routes).

Sans-IO and allocation-free on lookup: a table is a dict per prefix length
(``network int -> _Choice``); a lookup masks the destination once per prefix
length present, longest first. The ECMP pick is weighted by ``weight`` and
keyed by a *stable* flow hash (:func:`flow_hash`): every worker on every node
sends one flow down the same tunnel, so per-flow ordering survives anycast.

Tunnels without a usable path (no outbound SA yet, tunnel record missing) can
be marked down with :meth:`RouteTable.set_tunnel_up`; a prefix whose best
priority group is entirely down falls back to the next priority group, as a
router withdraws a route whose next hop is gone.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from dataclasses import dataclass

from replication.records import RouteRecord

_MASK32 = 0xFFFFFFFF
_MASK128 = (1 << 128) - 1


def flow_hash(src: int, dst: int, proto: int, sport: int, dport: int) -> int:
    """A 32-bit hash of the 5-tuple that is the same in every process.

    Python's ``hash`` of a tuple of ints is deterministic (only str/bytes are
    salted); the multiply spreads it so ``% total_weight`` is not biased by
    the low bits of the addresses.
    """
    h = hash((src, dst, proto, sport, dport)) & 0xFFFFFFFFFFFFFFFF
    h = (h * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return h >> 32


@dataclass(frozen=True, slots=True)
class _Choice:
    """The compiled ECMP group for one prefix: cumulative weights and tunnels."""

    tunnels: tuple[str, ...]
    cumulative: tuple[int, ...]
    total: int

    def pick(self, h: int) -> str:
        if len(self.tunnels) == 1:
            return self.tunnels[0]
        return self.tunnels[bisect_right(self.cumulative, h % self.total)]


class RouteTable:
    """One account's routes, IPv4 and IPv6."""

    def __init__(self, account_id: str, down: set[str] | None = None) -> None:
        self.account_id = account_id
        self._routes: dict[str, RouteRecord] = {}
        self._down: set[str] = set() if down is None else down
        """Tunnels to skip; :class:`Routes` shares one set across tables."""
        # version -> [(prefixlen, {network_int: _Choice})], longest first
        self._v4: list[tuple[int, int, dict[int, _Choice]]] = []
        self._v6: list[tuple[int, int, dict[int, _Choice]]] = []

    def __len__(self) -> int:
        return len(self._routes)

    @property
    def routes(self) -> dict[str, RouteRecord]:
        return dict(self._routes)

    def set(self, rec: RouteRecord) -> None:
        """Add or replace a route (same ``route_id``)."""
        if rec.account_id != self.account_id:
            raise ValueError("route belongs to another account")
        self._routes[rec.route_id] = rec
        self._compile()

    def delete(self, route_id: str) -> RouteRecord | None:
        rec = self._routes.pop(route_id, None)
        if rec is not None:
            self._compile()
        return rec

    def set_tunnel_up(self, tunnel_id: str, up: bool) -> None:
        """Mark a tunnel usable or not; its routes are skipped while down."""
        if up:
            self._down.discard(tunnel_id)
        else:
            self._down.add(tunnel_id)
        self.recompile_for(tunnel_id)

    def recompile_for(self, tunnel_id: str) -> None:
        if any(r.tunnel_id == tunnel_id for r in self._routes.values()):
            self._compile()

    def _compile(self) -> None:
        by_prefix: dict[tuple[int, int, int], list[RouteRecord]] = {}
        for rec in self._routes.values():
            if rec.tunnel_id in self._down:
                continue
            net = ipaddress.ip_network(rec.prefix)
            by_prefix.setdefault((net.version, net.prefixlen, int(net.network_address)), []).append(
                rec
            )
        v4: dict[int, dict[int, _Choice]] = {}
        v6: dict[int, dict[int, _Choice]] = {}
        for (version, plen, network), recs in by_prefix.items():
            best = min(r.priority for r in recs)
            group = sorted((r for r in recs if r.priority == best), key=lambda r: r.route_id)
            cumulative: list[int] = []
            total = 0
            for r in group:
                total += r.weight
                cumulative.append(total)
            # bisect_right(cumulative, x) for x in [0, total) is the index i
            # with cumulative[i-1] <= x < cumulative[i]: weight-proportional.
            choice = _Choice(tuple(r.tunnel_id for r in group), tuple(cumulative), total)
            (v4 if version == 4 else v6).setdefault(plen, {})[network] = choice
        self._v4 = [
            (plen, (_MASK32 << (32 - plen)) & _MASK32, v4[plen])
            for plen in sorted(v4, reverse=True)
        ]
        self._v6 = [
            (plen, (_MASK128 << (128 - plen)) & _MASK128, v6[plen])
            for plen in sorted(v6, reverse=True)
        ]

    def lookup(self, version: int, dst: int, h: int = 0) -> str | None:
        """The tunnel for destination ``dst`` (an int), ECMP-picked by ``h``."""
        for _plen, mask, nets in self._v4 if version == 4 else self._v6:
            choice = nets.get(dst & mask)
            if choice is not None:
                return choice.pick(h)
        return None

    def choice(self, version: int, dst: int) -> _Choice | None:
        """The ECMP group for ``dst``; the caller hashes the flow only when
        the group has more than one tunnel (hot path: most have one)."""
        for _plen, mask, nets in self._v4 if version == 4 else self._v6:
            choice = nets.get(dst & mask)
            if choice is not None:
                return choice
        return None

    def covers(self, version: int, dst: int) -> bool:
        """Whether any route (even one to a down tunnel) covers ``dst``."""
        if self.lookup(version, dst) is not None:
            return True
        if not self._down:
            return False
        for rec in self._routes.values():
            net = ipaddress.ip_network(rec.prefix)
            if net.version == version and int(net.network_address) == dst & int(net.netmask):
                return True
        return False


class Routes:
    """All accounts' route tables, built from ``route/<id>`` bus records."""

    def __init__(self) -> None:
        self.tables: dict[str, RouteTable] = {}
        self._account_of: dict[str, str] = {}
        self._down: set[str] = set()

    def apply_set(self, rec: RouteRecord) -> None:
        old = self._account_of.get(rec.route_id)
        if old is not None and old != rec.account_id:
            self.apply_delete(rec.route_id)
        table = self.tables.get(rec.account_id)
        if table is None:
            table = self.tables[rec.account_id] = RouteTable(rec.account_id, self._down)
        table.set(rec)
        self._account_of[rec.route_id] = rec.account_id

    def apply_delete(self, route_id: str) -> RouteRecord | None:
        account = self._account_of.pop(route_id, None)
        if account is None:
            return None
        table = self.tables[account]
        rec = table.delete(route_id)
        if not len(table):
            del self.tables[account]
        return rec

    def lookup(self, account_id: str, version: int, dst: int, h: int = 0) -> str | None:
        table = self.tables.get(account_id)
        return None if table is None else table.lookup(version, dst, h)

    def other_accounts_covering(self, account_id: str, version: int, dst: int) -> bool:
        """Whether ``dst`` is routed by some account other than ``account_id``.

        Used for the cross-account check on the inbound path (issue 10).
        """
        return any(acct != account_id and t.covers(version, dst) for acct, t in self.tables.items())

    def set_tunnel_up(self, tunnel_id: str, up: bool) -> None:
        """Mark a tunnel (of any account) usable or not; kept across route changes."""
        if up == (tunnel_id not in self._down):
            return
        if up:
            self._down.discard(tunnel_id)
        else:
            self._down.add(tunnel_id)
        for table in self.tables.values():
            table.recompile_for(tunnel_id)
