"""Traffic-selector matching on parsed flows (RFC 4301 §4.4.1, RFC 7296 §3.13.1).

An SA carries two selector lists: ``ts_local`` (our side, the virtual network)
and ``ts_remote`` (the customer's side). RFC 4301 §5.2: after decrypting, the
inner packet must match the SA's selectors or it is dropped — an inbound packet
needs its *source* in ``ts_remote`` and its *destination* in ``ts_local``; an
outbound packet the other way round. Each end is checked on address range,
protocol (0 = any) and that end's port range.

Selectors are compiled once, when the SA record arrives, into tuples of ints;
matching is a loop over a handful of tuples with no allocation. The very common
"everything" selector (``0.0.0.0/0`` or ``::/0``, any protocol, any port) is
detected at compile time and short-circuits.

Ports of a non-first fragment or of a protocol without ports arrive as 0
(``ip.parse_flow``); a selector with the full port range still matches them,
one restricted to some ports does not (RFC 4301 §7: non-initial fragments
cannot be checked against port selectors; we refuse rather than guess).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from replication.records import TrafficSelector

_Compiled = tuple[int, int, int, int, int, int]
"""(version, start, end, protocol, start_port, end_port)"""


class SelectorSet:
    """A compiled list of traffic selectors for one end of an SA."""

    __slots__ = ("any_v4", "any_v6", "items")

    def __init__(self, selectors: Iterable[TrafficSelector]) -> None:
        items: list[_Compiled] = []
        any_v4 = any_v6 = False
        for ts in selectors:
            a, b = ipaddress.ip_address(ts.start), ipaddress.ip_address(ts.end)
            c = (a.version, int(a), int(b), ts.protocol, ts.start_port, ts.end_port)
            full = ts.protocol == 0 and ts.start_port == 0 and ts.end_port == 65535
            if full and c[1] == 0 and c[2] == (0xFFFFFFFF if a.version == 4 else (1 << 128) - 1):
                if a.version == 4:
                    any_v4 = True
                else:
                    any_v6 = True
            items.append(c)
        self.items: tuple[_Compiled, ...] = tuple(items)
        self.any_v4 = any_v4
        self.any_v6 = any_v6

    def match(self, version: int, addr: int, proto: int, port: int) -> bool:
        """Whether one end of a packet (address, protocol, port) is covered."""
        if self.any_v4 if version == 4 else self.any_v6:
            return True
        for v, start, end, p, sp, ep in self.items:
            if (
                v == version
                and start <= addr <= end
                and (p == 0 or p == proto)
                and sp <= port <= ep
            ):
                return True
        return False

    def covers(self, other: SelectorSet) -> bool:
        """Whether every selector of ``other`` lies inside one of ours.

        Used when choosing among SAs: a narrower SA is preferred only if it
        covers the packet; this helps tests and diagnostics reason about sets.
        """
        for v, start, end, p, sp, ep in other.items:
            if not any(
                v == v2
                and s2 <= start
                and end <= e2
                and (p2 == 0 or p2 == p)
                and sp2 <= sp
                and ep <= ep2
                for v2, s2, e2, p2, sp2, ep2 in self.items
            ):
                return False
        return True


class SaSelectors:
    """Both ends of an SA's selectors, checked per direction."""

    __slots__ = ("local", "remote")

    def __init__(
        self, ts_local: Iterable[TrafficSelector], ts_remote: Iterable[TrafficSelector]
    ) -> None:
        self.local = SelectorSet(ts_local)
        self.remote = SelectorSet(ts_remote)

    def inbound_ok(
        self, version: int, src: int, dst: int, proto: int, sport: int, dport: int
    ) -> bool:
        """A decrypted packet from the customer: source remote, destination local."""
        return self.remote.match(version, src, proto, sport) and self.local.match(
            version, dst, proto, dport
        )

    def outbound_ok(
        self, version: int, src: int, dst: int, proto: int, sport: int, dport: int
    ) -> bool:
        """A packet toward the customer: source local, destination remote."""
        return self.local.match(version, src, proto, sport) and self.remote.match(
            version, dst, proto, dport
        )
