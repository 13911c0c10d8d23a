"""Traffic selector matching (RFC 4301 §5.2 inbound check, both directions)."""

from __future__ import annotations

import ipaddress

from dataplane.selectors import SaSelectors, SelectorSet
from replication.records import TrafficSelector

TS = TrafficSelector


def ip(s: str) -> int:
    return int(ipaddress.ip_address(s))


def test_any_selector_matches_everything_of_its_family_only() -> None:
    s = SelectorSet([TS.from_network("0.0.0.0/0")])
    assert s.any_v4 and not s.any_v6
    assert s.match(4, ip("1.2.3.4"), 6, 80)
    assert not s.match(6, ip("::1"), 6, 80)


def test_range_protocol_and_ports() -> None:
    s = SelectorSet([TS("10.0.0.10", "10.0.0.20", 6, 80, 443)])
    assert s.match(4, ip("10.0.0.10"), 6, 80)
    assert s.match(4, ip("10.0.0.20"), 6, 443)
    assert not s.match(4, ip("10.0.0.21"), 6, 80)
    assert not s.match(4, ip("10.0.0.9"), 6, 80)
    assert not s.match(4, ip("10.0.0.15"), 17, 80)
    assert not s.match(4, ip("10.0.0.15"), 6, 444)
    # ports unknown (fragment / ICMP) are 0: refused by a port-restricted selector
    assert not s.match(4, ip("10.0.0.15"), 6, 0)


def test_sa_selectors_check_source_and_destination_by_direction() -> None:
    sel = SaSelectors(
        ts_local=(TS.from_network("10.0.0.0/24"), TS.from_network("fd00:1::/64")),
        ts_remote=(TS.from_network("192.168.1.0/24"),),
    )
    assert sel.inbound_ok(4, ip("192.168.1.5"), ip("10.0.0.7"), 1, 0, 0)
    assert not sel.inbound_ok(4, ip("10.0.0.7"), ip("192.168.1.5"), 1, 0, 0)
    assert sel.outbound_ok(4, ip("10.0.0.7"), ip("192.168.1.5"), 17, 53, 53)
    assert not sel.outbound_ok(4, ip("10.0.0.7"), ip("192.168.2.5"), 17, 53, 53)
    # family mismatch between ends never matches
    assert not sel.inbound_ok(6, ip("192.168.1.5"), ip("fd00:1::1"), 58, 0, 0)


def test_covers() -> None:
    wide = SelectorSet([TS.from_network("10.0.0.0/16")])
    narrow = SelectorSet([TS.from_network("10.0.5.0/24")])
    assert wide.covers(narrow) and not narrow.covers(wide)
