"""Route tables: LPM, priority, weighted ECMP by a stable flow hash, accounts."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections import Counter
from pathlib import Path

from dataplane.routes import Routes, RouteTable, flow_hash

from ._worker_records import ACCOUNT_A, ACCOUNT_B, route, tid

ROOT = Path(__file__).resolve().parents[2]


def ip(s: str) -> int:
    return int(ipaddress.ip_address(s))


def test_longest_prefix_wins_v4_and_v6() -> None:
    t = RouteTable(ACCOUNT_A)
    t.set(route(1, "10.0.0.0/8", 1))
    t.set(route(2, "10.1.0.0/16", 2))
    t.set(route(3, "10.1.2.0/24", 3))
    t.set(route(4, "2001:db8::/32", 4))
    t.set(route(5, "2001:db8:1::/48", 5))
    assert t.lookup(4, ip("10.1.2.3")) == tid(3)
    assert t.lookup(4, ip("10.1.3.3")) == tid(2)
    assert t.lookup(4, ip("10.9.9.9")) == tid(1)
    assert t.lookup(4, ip("11.0.0.1")) is None
    assert t.lookup(6, ip("2001:db8:1::1")) == tid(5)
    assert t.lookup(6, ip("2001:db8:2::1")) == tid(4)
    assert t.lookup(6, ip("2001:db9::1")) is None
    # v4 routes never answer v6 lookups of the same integer
    assert t.lookup(6, ip("10.1.2.3")) is None


def test_default_route_and_host_route() -> None:
    t = RouteTable(ACCOUNT_A)
    t.set(route(1, "0.0.0.0/0", 1))
    t.set(route(2, "192.168.1.1/32", 2))
    assert t.lookup(4, ip("192.168.1.1")) == tid(2)
    assert t.lookup(4, ip("192.168.1.2")) == tid(1)


def test_lower_priority_wins_and_falls_back_when_tunnel_down() -> None:
    t = RouteTable(ACCOUNT_A)
    t.set(route(1, "10.0.0.0/24", 1, priority=200))
    t.set(route(2, "10.0.0.0/24", 2, priority=100))
    assert t.lookup(4, ip("10.0.0.5")) == tid(2)
    t.set_tunnel_up(tid(2), False)
    assert t.lookup(4, ip("10.0.0.5")) == tid(1)
    assert t.covers(4, ip("10.0.0.5"))
    t.set_tunnel_up(tid(1), False)
    assert t.lookup(4, ip("10.0.0.5")) is None
    assert t.covers(4, ip("10.0.0.5"))  # still routed, just not usable
    t.set_tunnel_up(tid(2), True)
    assert t.lookup(4, ip("10.0.0.5")) == tid(2)


def test_ecmp_is_weighted_and_stable_per_flow() -> None:
    t = RouteTable(ACCOUNT_A)
    t.set(route(1, "10.0.0.0/24", 1, weight=100))
    t.set(route(2, "10.0.0.0/24", 2, weight=300))
    picks = Counter()
    for sport in range(20000):
        h = flow_hash(ip("172.16.0.1"), ip("10.0.0.9"), 6, 1024 + sport, 443)
        first = t.lookup(4, ip("10.0.0.9"), h)
        assert t.lookup(4, ip("10.0.0.9"), h) == first  # same flow, same tunnel
        picks[first] += 1
    share = picks[tid(2)] / 20000
    assert 0.72 < share < 0.78, picks


def test_flow_hash_is_the_same_in_another_process() -> None:
    args = (ip("172.16.0.1"), ip("10.0.0.9"), 17, 5000, 53)
    code = f"from dataplane.routes import flow_hash;print(flow_hash(*{args!r}))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(ROOT),
    )
    assert int(other.stdout) == flow_hash(*args)


def test_accounts_have_separate_tables_with_overlapping_prefixes() -> None:
    r = Routes()
    r.apply_set(route(1, "10.0.0.0/24", 1, account=ACCOUNT_A))
    r.apply_set(route(2, "10.0.0.0/24", 2, account=ACCOUNT_B))
    r.apply_set(route(3, "10.9.0.0/24", 3, account=ACCOUNT_B))
    assert r.lookup(ACCOUNT_A, 4, ip("10.0.0.1")) == tid(1)
    assert r.lookup(ACCOUNT_B, 4, ip("10.0.0.1")) == tid(2)
    assert r.lookup(ACCOUNT_A, 4, ip("10.9.0.1")) is None
    assert r.other_accounts_covering(ACCOUNT_A, 4, ip("10.9.0.1"))
    assert not r.other_accounts_covering(ACCOUNT_B, 4, ip("10.9.0.1"))
    assert r.lookup("nobody", 4, ip("10.0.0.1")) is None


def test_delete_and_move_between_accounts() -> None:
    r = Routes()
    r.apply_set(route(1, "10.0.0.0/24", 1, account=ACCOUNT_A))
    assert r.apply_delete(f"{1:032x}") is not None
    assert r.lookup(ACCOUNT_A, 4, ip("10.0.0.1")) is None
    assert ACCOUNT_A not in r.tables
    assert r.apply_delete(f"{1:032x}") is None
    r.apply_set(route(1, "10.0.0.0/24", 1, account=ACCOUNT_A))
    r.apply_set(route(1, "10.0.0.0/24", 1, account=ACCOUNT_B))
    assert r.lookup(ACCOUNT_A, 4, ip("10.0.0.1")) is None
    assert r.lookup(ACCOUNT_B, 4, ip("10.0.0.1")) == tid(1)


def test_tunnel_down_state_survives_route_arrival() -> None:
    r = Routes()
    r.set_tunnel_up(tid(1), False)
    r.apply_set(route(1, "10.0.0.0/24", 1))
    r.apply_set(route(2, "10.0.0.0/24", 2, priority=300))
    assert r.lookup(ACCOUNT_A, 4, ip("10.0.0.1")) == tid(2)
    r.set_tunnel_up(tid(1), True)
    assert r.lookup(ACCOUNT_A, 4, ip("10.0.0.1")) == tid(1)
