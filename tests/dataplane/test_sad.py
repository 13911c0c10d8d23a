"""The SAD: SPI lookup, newest-generation outbound choice, GRE pairs, expiry."""

from __future__ import annotations

import ipaddress

import pytest

from dataplane.sad import Sad
from replication.records import Direction, SaRecord, TrafficSelector, TunnelKind

from ._worker_records import ACCOUNT_B, sa, tid, tunnel


class FakeIn:
    def __init__(self, rec: SaRecord) -> None:
        self.spi = rec.spi

    def decapsulate(self, packet: bytes | bytearray | memoryview) -> tuple[int, memoryview]:
        return 4, memoryview(bytes(packet))


class FakeOut:
    built = 0

    def __init__(self, rec: SaRecord) -> None:
        self.spi = rec.spi
        FakeOut.built += 1

    def overhead(self, inner_len: int) -> int:
        return 0

    def encapsulate_into(self, out: bytearray, offset: int, inner, next_header: int) -> int:
        return 0


def ip(s: str) -> int:
    return int(ipaddress.ip_address(s))


def flow(src: str, dst: str) -> tuple[int, int, int, int, int, int]:
    return (4, ip(src), ip(dst), 6, 1000, 80)


def make() -> Sad:
    return Sad(FakeIn, FakeOut)


def test_inbound_by_spi_and_replace_and_delete() -> None:
    s = make()
    r = sa(0x1000, Direction.IN)
    s.apply_sa(r.key, r)
    assert s.inbound[0x1000].tunnel_id == tid(1)
    assert s.sa_count == 1
    s.delete_sa(r.key)
    assert 0x1000 not in s.inbound
    s.delete_sa(r.key)  # idempotent tombstone


def test_outbound_prefers_newest_generation_covering_the_packet() -> None:
    s = make()
    old = sa(0x2000, Direction.OUT, generation=0)
    new = sa(0x2001, Direction.OUT, generation=1, created=2000.0)
    s.apply_sa(old.key, old)
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1")).spi == 0x2000
    s.apply_sa(new.key, new)  # make-before-break: both present, new one wins
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1")).spi == 0x2001
    s.delete_sa(new.key)
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1")).spi == 0x2000
    s.delete_sa(old.key)
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1")) is None
    assert tid(1) not in s.outbound


def test_outbound_skips_newer_sa_whose_selectors_do_not_cover() -> None:
    s = make()
    wide = sa(0x3000, Direction.OUT, generation=0)
    narrow = sa(
        0x3001,
        Direction.OUT,
        generation=5,
        child_id=2,
        ts_remote=(TrafficSelector.from_network("192.168.9.0/24"),),
    )
    s.apply_sa(wide.key, wide)
    s.apply_sa(narrow.key, narrow)
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.9.9")).spi == 0x3001
    assert s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1")).spi == 0x3000


def test_cipher_built_once_per_record() -> None:
    s = make()
    before = FakeOut.built
    r = sa(0x4000, Direction.OUT)
    s.apply_sa(r.key, r)
    for _ in range(100):
        s.outbound_for(tid(1), *flow("10.0.0.1", "192.168.0.1"))
    assert FakeOut.built == before + 1


def test_factory_failure_changes_nothing() -> None:
    def boom(rec: SaRecord) -> FakeIn:
        raise ValueError("unsupported")

    s = Sad(boom, FakeOut)
    r = sa(0x5000, Direction.IN)
    with pytest.raises(ValueError):
        s.apply_sa(r.key, r)
    assert not s.inbound


def test_gre_tunnel_by_outer_pair_and_usability() -> None:
    s = make()
    g = tunnel(7, kind=TunnelKind.GRE, local="192.0.2.1", remote="203.0.113.9", account=ACCOUNT_B)
    s.apply_tunnel(g.key, g)
    assert s.gre[("192.0.2.1", "203.0.113.9")].record.tunnel_id == tid(7)
    assert s.tunnel_usable(tid(7))
    i = tunnel(1)
    s.apply_tunnel(i.key, i)
    assert not s.tunnel_usable(tid(1))  # IPsec without an outbound SA
    o = sa(0x6000, Direction.OUT)
    s.apply_sa(o.key, o)
    assert s.tunnel_usable(tid(1))
    s.delete_tunnel(g.key)
    assert not s.gre and not s.tunnel_usable(tid(7))


def test_expire_uses_given_time() -> None:
    s = make()
    r = sa(0x7000, Direction.IN, expire_at=500.0)
    keep = sa(0x7001, Direction.OUT, expire_at=0.0)
    s.apply_sa(r.key, r)
    s.apply_sa(keep.key, keep)
    assert s.expire(499.0) == []
    assert s.expire(500.0) == [r.key]
    assert 0x7000 not in s.inbound and s.sa_count == 1
