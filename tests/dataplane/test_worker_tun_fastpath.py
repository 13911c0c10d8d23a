"""The worker's TUN drainer: packets read straight into the ESP buffer and
encrypted in place for cached IPv4 flows (``Dataplane.flow_entry``), every
other packet through ``Dataplane.outbound``. Whatever path a packet takes, the
peer (an independent ``InboundSa`` here, scapy's ESP in the netns tests) must
see the same thing ``Dataplane.outbound`` alone would send; records that
change the decision must take effect on the next packet.

The "TUN" is one end of an AF_UNIX datagram socketpair (one read = one
packet, like a TUN queue without IFF_VNET_HDR); nothing touches the network.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from dataplane import esp
from dataplane.drops import DropReason
from dataplane.worker import AccountNet, Worker, WorkerConfig
from replication.records import Cipher, Direction, TrafficSelector

from ._worker_records import ACCOUNT_A, route, sa, tunnel

SRC, DST = "10.1.0.2", "10.2.0.9"


class Rig:
    def __init__(self, run_dir: Path, *records: object) -> None:
        self.w = Worker(WorkerConfig(anycast="192.0.2.1", run_dir=run_dir, metrics_port=0))
        self.sent: list[tuple[str, bytes, tuple[str, int], object]] = []
        dp = self.w.dp
        dp.send_esp = lambda d, a, anc: self.sent.append(("esp", bytes(d), a, anc))
        dp.send_udp = lambda d, a, anc: self.sent.append(("udp", bytes(d), a, anc))
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.b.setblocking(False)
        self.net = AccountNet(ACCOUNT_A, lambda d: None, fd=self.b.fileno())
        for rec in records:
            self.apply(rec)
        dp.attach_account(self.net)
        self.drain = self.w._tun_drainer(self.net)

    def apply(self, rec: object) -> None:
        self.w.dp.apply(rec.key, rec)  # type: ignore[attr-defined]

    def send(self, *packets: bytes) -> list[tuple[str, bytes, tuple[str, int], object]]:
        start = len(self.sent)
        for p in packets:
            self.a.send(p)
        self.drain()
        return self.sent[start:]

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def rig(tmp_path: Path):
    made: list[Rig] = []

    def make(*records: object) -> Rig:
        r = Rig(tmp_path / f"w{len(made)}", *records)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _in_of(out_rec):
    return esp.InboundSa.from_record(out_rec)


def _decrypt(out_rec, wire: bytes) -> tuple[int, bytes]:
    nh, inner = _in_of(out_rec).decapsulate(wire)
    return nh, bytes(inner)


def test_cached_flow_is_encrypted_in_place_and_decrypts(rig) -> None:
    out = sa(0x2001, Direction.OUT, udp_encap=True)
    r = rig(tunnel(1), route(1, "10.2.0.0/24", 1), out)
    pkts = [
        bytes(IP(src=SRC, dst=DST, tos=tos) / UDP(sport=5000, dport=9) / (b"x" * size))
        for tos, size in ((0, 1372), (0, 1372), (1, 10), (0, 1))
    ]
    sent = r.send(*pkts)
    assert len(sent) == 4
    for (kind, wire, dest, _anc), p in zip(sent, pkts, strict=True):
        assert kind == "udp" and dest == ("198.51.100.2", 4500)
        nh, inner = _decrypt(out, wire)
        assert nh == 4 and inner == p
    # ECN: the inner ECT(1) packet got its IP_TOS control message, the others none
    assert [bool(s[3]) for s in sent] == [False, False, True, False]
    # sequence numbers run on, one per packet; the flow is cached now
    assert [int.from_bytes(s[1][4:8], "big") for s in sent] == [1, 2, 3, 4]
    key = int.from_bytes(pkts[0][12:20], "big")
    assert r.w.dp.flows[ACCOUNT_A][key] is not None
    t = r.w.dp.sad.tunnels[tunnel(1).tunnel_id]
    assert t.packets_out == 4 and t.bytes_out == sum(map(len, pkts))
    assert r.w.dp.sad.outbound[t.record.tunnel_id][0].packets == 4


def test_raw_esp_and_slow_path_packets(rig) -> None:
    out = sa(0x2002, Direction.OUT)  # raw ESP
    r = rig(tunnel(1, mtu=1400), route(1, "10.2.0.0/24", 1), out)
    syn = bytes(IP(src=SRC, dst=DST) / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1460)]))
    big_df = bytes(IP(src=SRC, dst=DST, flags="DF") / UDP() / (b"y" * 1450))
    big = bytes(IP(src=SRC, dst=DST) / UDP() / (b"z" * 1450))
    plain = bytes(IP(src=SRC, dst=DST) / ICMP())
    sent = r.send(plain, syn, big_df, big, plain)
    kinds = {s[0] for s in sent}
    assert kinds == {"esp"}
    inners = [_decrypt(out, s[1])[1] for s in sent]
    assert inners[0] == plain and inners[-1] == plain
    # the SYN was clamped to the tunnel MTU's MSS (slow path, RFC 6691)
    assert TCP(IP(inners[1])[TCP].build())[TCP].options[0] == ("MSS", 1360)
    # too big with DF: dropped and counted; without DF: fragmented
    assert r.w.dp.drops[DropReason.MTU] == 1
    frags = [IP(i) for i in inners[2:-1]]
    assert len(frags) >= 2 and all(len(f) <= 1400 for f in frags)
    assert [int.from_bytes(s[1][4:8], "big") for s in sent] == list(range(1, len(sent) + 1))


def test_record_changes_apply_to_the_next_packet(rig) -> None:
    out1 = sa(0x2003, Direction.OUT, udp_encap=True)
    r = rig(tunnel(1), tunnel(2, remote="198.51.100.3"), route(1, "10.2.0.0/24", 1), out1)
    p = bytes(IP(src=SRC, dst=DST) / UDP(sport=7, dport=8) / b"data")
    assert _decrypt(out1, r.send(p)[0][1])[1] == p
    # a newer SA on the tunnel (rekey): the next packet uses it
    out2 = sa(0x2004, Direction.OUT, udp_encap=True, generation=1)
    r.apply(out2)
    (s,) = r.send(p)
    assert s[1][:4] == (0x2004).to_bytes(4, "big")
    assert _decrypt(out2, s[1])[1] == p
    # the route moves to tunnel 2 (which has an SA of its own)
    out3 = sa(0x2005, Direction.OUT, tunnel_n=2, remote="198.51.100.3")
    r.apply(out3)
    r.apply(route(1, "10.2.0.0/24", 2))
    (s,) = r.send(p)
    assert s[0] == "esp" and s[2] == ("198.51.100.3", 0) and _decrypt(out3, s[1])[1] == p
    # the route goes: no route, counted, nothing sent
    r.w.dp.remove(route(1, "10.2.0.0/24", 2).key)
    assert r.send(p) == []
    assert r.w.dp.drops[DropReason.NO_ROUTE] == 1


def test_uncacheable_flows_still_follow_outbound(rig) -> None:
    # the SA's selectors name a port: not address-only, every packet is checked
    port_ts = TrafficSelector("10.2.0.0", "10.2.0.255", 17, 53, 53)
    out = sa(0x2006, Direction.OUT, ts_remote=(port_ts,))
    r = rig(tunnel(1), route(1, "10.2.0.0/24", 1), out)
    dns = bytes(IP(src=SRC, dst=DST) / UDP(sport=9, dport=53) / b"q")
    other = bytes(IP(src=SRC, dst=DST) / UDP(sport=9, dport=54) / b"q")
    sent = r.send(dns, other, dns)
    assert [_decrypt(out, s[1])[1] for s in sent] == [dns, dns]
    assert r.w.dp.drops[DropReason.SELECTOR] == 1


@pytest.mark.parametrize("udp_encap", [True, False])
def test_aes_cbc_flow_is_moved_to_its_payload_offset_and_encrypted_in_place(
    rig, udp_encap: bool
) -> None:
    out = sa(0x2007, Direction.OUT, cipher=Cipher.AES256CBC, udp_encap=udp_encap)
    r = rig(tunnel(1), route(1, "10.2.0.0/24", 1), out)
    # every pad length (0..15 octets of CBC padding), the largest the MTU allows
    pkts = [bytes(IP(src=SRC, dst=DST) / UDP() / (b"c" * (333 + k))) for k in range(16)]
    pkts.append(bytes(IP(src=SRC, dst=DST, tos=1) / UDP() / (b"m" * 1372)))
    slow: list[bytes] = []
    outbound = r.w.dp.outbound
    r.w.dp.outbound = lambda net, pkt, *a: (slow.append(bytes(pkt)), outbound(net, pkt, *a))
    r.drain = r.w._tun_drainer(r.net)  # sees the spy
    sent = r.send(*pkts)
    assert slow == []  # not one took Dataplane.outbound
    assert [s[0] for s in sent] == ["udp" if udp_encap else "esp"] * len(pkts)
    assert [_decrypt(out, s[1]) for s in sent] == [(4, p) for p in pkts]
    assert [int.from_bytes(s[1][4:8], "big") for s in sent] == list(range(1, len(pkts) + 1))
    assert bool(sent[-1][3]) and not sent[0][3]  # ECT(1) inner: its outer ECN message
    key = int.from_bytes(pkts[0][12:20], "big")
    assert r.w.dp.flows[ACCOUNT_A][key] is not None  # cached: the fast path took them
    assert r.w.dp.sad.outbound[out.tunnel_id][0].packets == len(pkts)


def test_replay_protected_sa_only_the_owner_sends(rig) -> None:
    import dataclasses

    from dataplane.worker import rendezvous_owner

    out = sa(0x2008, Direction.OUT, udp_encap=True)
    t = dataclasses.replace(tunnel(1), replay_protection=True)
    r = rig(t, route(1, "10.2.0.0/24", 1), out)
    handed: list[tuple[str, int, bytes]] = []
    r.w.dp.handoff = lambda acct, owner, pkt: handed.append((acct, owner, bytes(pkt)))
    p = bytes(IP(src=SRC, dst=DST) / UDP(sport=7, dport=8) / b"owned")
    owner = rendezvous_owner(0x2008, (0, 1))
    r.w.dp.me = 1 - owner  # another worker owns the SA: handed over, not sent
    r.w.dp.live = (0, 1)
    assert r.send(p, p) == []
    assert handed == [(ACCOUNT_A, owner, p)] * 2
    r.w.dp.live = (1 - owner,)  # the owner is gone: this worker sends from now on
    (s,) = r.send(p)
    assert _decrypt(out, s[1])[1] == p
    r.w.dp.live = (0, 1)
    r.w.dp.me = owner
    (s,) = r.send(p)
    assert _decrypt(out, s[1])[1] == p and len(handed) == 2
    # ownership moves away while the flow is cached: handed over again
    r.w.dp.me = 1 - owner
    assert r.send(p) == [] and len(handed) == 3


def test_a_malformed_packet_is_dropped_and_does_not_pin_its_flow(rig) -> None:
    out = sa(0x2009, Direction.OUT, udp_encap=True)
    r = rig(tunnel(1), route(1, "10.2.0.0/24", 1), out)
    good = bytes(IP(src=SRC, dst=DST) / UDP(sport=7, dport=8) / (b"g" * 100))
    bad = bytearray(good)
    bad[2:4] = (len(good) + 50).to_bytes(2, "big")  # IPv4 total length beyond the packet
    assert r.send(bytes(bad)) == []
    assert r.w.dp.drops[DropReason.MALFORMED] == 1
    (s,) = r.send(good)
    assert _decrypt(out, s[1])[1] == good
    key = int.from_bytes(good[12:20], "big")
    assert r.w.dp.flows[ACCOUNT_A][key] is not None  # cached by the good packet
    assert r.send(bytes(bad)) == [] and r.w.dp.drops[DropReason.MALFORMED] == 2


def test_gre_flow_is_encapsulated_where_it_was_read(rig) -> None:
    """GRE tunnels take the fast path too: what leaves must be what
    ``Dataplane.outbound`` sends for the same packet (scapy parses it)."""
    import dataclasses

    from scapy.layers.l2 import GRE

    from replication.records import TunnelKind

    t = dataclasses.replace(tunnel(1, kind=TunnelKind.GRE, gre_key=0x1234, mtu=1400), ttl=17)
    r = rig(t, route(1, "10.2.0.0/24", 1))
    gre_sent: list[tuple[bytes, tuple[str, int], object]] = []
    r.w.dp.send_gre = lambda d, a, anc: gre_sent.append((bytes(d), a, anc))
    pkts = [
        bytes(IP(src=SRC, dst=DST, tos=tos) / UDP(sport=5000, dport=9) / (b"g" * size))
        for tos, size in ((0, 1372), (0, 1), (2, 10), (0, 100))
    ]
    slow: list[bytes] = []
    outbound = r.w.dp.outbound
    r.w.dp.outbound = lambda net, pkt, *a: (slow.append(bytes(pkt)), outbound(net, pkt, *a))
    r.drain = r.w._tun_drainer(r.net)  # sees the spy
    r.send(*pkts)
    assert slow == []  # not one took Dataplane.outbound
    r.w.dp.outbound = outbound
    key = int.from_bytes(pkts[0][12:20], "big")
    assert type(r.w.dp.flows[ACCOUNT_A][key][0]).__name__ == "GreFlow"  # cached: fast path
    assert len(gre_sent) == 4
    for (wire, dest, _anc), p in zip(gre_sent, pkts, strict=True):
        assert dest == ("198.51.100.2", 0)
        g = GRE(wire)
        assert (g.key_present, g.key, g.proto, g.chksum_present, g.seqnum_present) == (
            1, 0x1234, 0x0800, 0, 0,
        )  # fmt: skip
        assert bytes(g.payload) == p
    # the slow path sends the same bytes and control messages (TTL 17, ECN copy)
    fast = list(gre_sent)
    gre_sent.clear()
    for p in pkts:
        r.w.dp.outbound(r.net, memoryview(bytearray(p)))
    assert gre_sent == fast
    assert fast[2][2] != fast[0][2]  # ECT(0) inner: its outer ECN control message
    te = r.w.dp.sad.tunnels[t.tunnel_id]
    assert te.packets_out == 8 and te.bytes_out == 2 * sum(map(len, pkts))


def test_gre_fast_path_leaves_syn_mtu_and_record_changes_to_outbound(rig) -> None:
    import dataclasses

    from scapy.layers.l2 import GRE

    from replication.records import TunnelKind

    t = tunnel(1, kind=TunnelKind.GRE, mtu=1400)
    r = rig(t, route(1, "10.2.0.0/24", 1))
    gre_sent: list[bytes] = []
    r.w.dp.send_gre = lambda d, a, anc: gre_sent.append(bytes(d))
    plain = bytes(IP(src=SRC, dst=DST) / ICMP())
    syn = bytes(IP(src=SRC, dst=DST) / TCP(sport=1, dport=2, flags="S", options=[("MSS", 1460)]))
    big_df = bytes(IP(src=SRC, dst=DST, flags="DF") / UDP() / (b"y" * 1450))
    big = bytes(IP(src=SRC, dst=DST) / UDP() / (b"z" * 1450))
    r.send(plain, syn, big_df, big, plain)
    inners = [bytes(GRE(w).payload) for w in gre_sent]
    assert GRE(gre_sent[0]).key_present == 0 and len(gre_sent[0]) == 4 + len(plain)
    assert inners[0] == plain and inners[-1] == plain
    assert TCP(IP(inners[1])[TCP].build())[TCP].options[0] == ("MSS", 1360)  # clamped
    assert r.w.dp.drops[DropReason.MTU] == 1
    frags = [IP(i) for i in inners[2:-1]]
    assert len(frags) >= 2 and all(len(f) <= 1400 for f in frags)
    # a new key on the tunnel applies to the next packet of the cached flow
    r.apply(dataclasses.replace(t, gre_key=77))
    gre_sent.clear()
    r.send(plain)
    (w,) = gre_sent
    assert (GRE(w).key_present, GRE(w).key, bytes(GRE(w).payload)) == (1, 77, plain)
    # the tunnel goes (its routes with it): counted, nothing sent
    r.w.dp.remove(t.key)
    gre_sent.clear()
    r.send(plain)
    assert gre_sent == []
    assert {k: v for k, v in r.w.dp.drops.items() if v} == {
        DropReason.MTU: 1,
        DropReason.NO_ROUTE: 1,
    }


def test_a_tunnel_whose_listener_is_not_open_is_a_counted_drop_not_a_crash(rig, caplog) -> None:
    """A worker started with ``--listen`` leaving out ESP, GRE or UDP 4500
    still gets every tunnel from the bus: its packets must be counted drops
    with one warning naming the listener, on the fast and the slow path."""
    import logging

    from replication.records import TunnelKind

    gre_t = tunnel(2, kind=TunnelKind.GRE, remote="198.51.100.3")
    r = rig(
        tunnel(1), route(1, "10.2.0.0/24", 1), sa(0x2010, Direction.OUT, udp_encap=True),
        tunnel(3, remote="198.51.100.4"), route(3, "10.3.0.0/24", 3),
        sa(0x2011, Direction.OUT, tunnel_n=3, remote="198.51.100.4"),
        gre_t, route(2, "10.4.0.0/24", 2),
    )  # fmt: skip
    w = r.w
    assert w.raw_esp is None and w.raw_gre is None and w.udp4500 is None  # never started
    w._install_senders()
    r.drain = w._tun_drainer(r.net)
    pkts = [
        bytes(IP(src=SRC, dst=dst) / UDP(sport=1, dport=2) / b"x")
        for dst in ("10.2.0.9", "10.3.0.9", "10.4.0.9")
    ]
    syn = bytes(IP(src=SRC, dst="10.4.0.9") / TCP(flags="S"))  # the slow path
    with caplog.at_level(logging.WARNING, logger="anywan.worker"):
        assert r.send(*pkts, *pkts, syn) == []  # nothing sent, nothing raised
    assert w.dp.drops[DropReason.NO_TUNNEL] == 7
    warned = [rec.getMessage() for rec in caplog.records if "--listen" in rec.getMessage()]
    assert len(warned) == 3  # once per listener
    assert {m.split("--listen ")[1].split()[0] for m in warned} == {"udp4500", "esp", "gre"}
