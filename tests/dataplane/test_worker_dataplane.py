"""The worker's per-packet core in memory: real ESP/GRE codecs, fake senders.

Checks with scapy as the independent parser where bytes leave the worker.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation

from dataplane import esp
from dataplane.drops import DropReason
from dataplane.worker import AccountNet, Dataplane
from replication.records import Direction, SaRecord, TrafficSelector, TunnelKind

from ._worker_records import ACCOUNT_A, ACCOUNT_B, route, sa, tunnel


class Box:
    def __init__(self) -> None:
        self.esp: list[tuple[bytes, tuple[str, int]]] = []
        self.udp: list[tuple[bytes, tuple[str, int]]] = []
        self.gre: list[tuple[bytes, tuple[str, int]]] = []
        self.tun: dict[str, list[bytes]] = {ACCOUNT_A: [], ACCOUNT_B: []}
        self.anc: list[list[tuple[int, int, bytes]]] = []
        """sendmsg control messages of each packet sent, in order."""


def make(*records: object) -> tuple[Dataplane, Box, dict[str, AccountNet]]:
    box = Box()
    dp = Dataplane(
        inbound_factory=esp.InboundSa.from_record,
        outbound_factory=lambda r: esp.OutboundSa.from_record(r, worker_id=3),
        send_esp=lambda d, a, anc: box.esp.append((bytes(d), a)) or box.anc.append(anc),
        send_udp=lambda d, a, anc: box.udp.append((bytes(d), a)) or box.anc.append(anc),
        send_gre=lambda d, a, anc: box.gre.append((bytes(d), a)) or box.anc.append(anc),
    )
    for rec in records:
        dp.apply(rec.key, rec)  # type: ignore[attr-defined]
    nets = {}
    for acct in (ACCOUNT_A, ACCOUNT_B):
        net = AccountNet(acct, lambda d, acct=acct: box.tun[acct].append(bytes(d)))
        dp.attach_account(net)
        nets[acct] = net
    return dp, box, nets


def scapy_sa(rec: SaRecord, src: str, dst: str) -> SecurityAssociation:
    return SecurityAssociation(
        ESP, spi=rec.spi, crypt_algo="AES-GCM", crypt_key=rec.enc_key + rec.salt,
        crypt_icv_size=16, tunnel_header=IP(src=src, dst=dst),
    )  # fmt: skip


IN = sa(0x1001, Direction.IN)
OUT = sa(0x2001, Direction.OUT, udp_encap=True, remote_port=4501)
BASE = (tunnel(1), route(1, "10.2.0.0/24", 1), IN, OUT)


def test_outbound_esp_in_udp_decrypts_with_scapy_and_carries_worker_id() -> None:
    dp, box, nets = make(*BASE)
    pkt = bytes(IP(src="10.1.0.2", dst="10.2.0.9") / UDP(sport=1, dport=2) / b"hi")
    dp.outbound(nets[ACCOUNT_A], memoryview(pkt))
    ((data, dest),) = box.udp
    assert dest == ("198.51.100.2", 4501)
    wrapped = IP(bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=50) / data))
    inner = scapy_sa(OUT, "192.0.2.1", "198.51.100.2").decrypt(wrapped)
    assert bytes(inner) == pkt
    assert int.from_bytes(data[8:12]) == 3  # RFC 4106 IV: worker id in the high bits


def test_inbound_goes_only_to_the_sa_account_and_checks_selectors() -> None:
    narrow = sa(0x1002, Direction.IN, ts_remote=(TrafficSelector.from_network("10.2.0.0/24"),))
    dp, box, _ = make(*BASE, narrow)
    s = scapy_sa(IN, "198.51.100.2", "192.0.2.1")
    inner = IP(src="10.2.0.9", dst="10.1.0.2") / ICMP()
    dp.inbound_esp(memoryview(bytes(s.encrypt(inner)[ESP])))
    assert box.tun[ACCOUNT_A] == [bytes(inner)] and box.tun[ACCOUNT_B] == []
    s2 = scapy_sa(narrow, "198.51.100.2", "192.0.2.1")
    dp.inbound_esp(memoryview(bytes(s2.encrypt(IP(src="10.9.0.1", dst="10.1.0.2") / ICMP())[ESP])))
    assert dp.drops[DropReason.SELECTOR] == 1 and len(box.tun[ACCOUNT_A]) == 1


def test_cross_account_both_directions() -> None:
    dp, box, nets = make(
        *BASE,
        tunnel(9, account=ACCOUNT_B, kind=TunnelKind.GRE, remote="203.0.113.9"),
        route(9, "10.50.0.0/24", 9, account=ACCOUNT_B),
    )
    s = scapy_sa(IN, "198.51.100.2", "192.0.2.1")
    dp.inbound_esp(memoryview(bytes(s.encrypt(IP(src="10.2.0.9", dst="10.50.0.1") / ICMP())[ESP])))
    assert dp.drops[DropReason.CROSS_ACCOUNT] == 1 and box.tun[ACCOUNT_B] == []
    # outbound: A's TUN cannot reach B's routes, B's TUN uses B's tunnel only
    pkt = bytes(IP(src="10.1.0.2", dst="10.50.0.1") / ICMP())
    dp.outbound(nets[ACCOUNT_A], memoryview(pkt))
    assert dp.drops[DropReason.NO_ROUTE] == 1
    dp.outbound(nets[ACCOUNT_B], memoryview(pkt))
    assert [a for _, a in box.gre] == [("203.0.113.9", 0)]


def test_df_clear_fragments_before_encapsulation_df_set_gets_icmp() -> None:
    dp, box, nets = make(*BASE)  # tunnel MTU 1400
    big = IP(src="10.1.0.2", dst="10.2.0.9", flags=0) / UDP(sport=1, dport=2) / (b"z" * 2000)
    dp.outbound(nets[ACCOUNT_A], memoryview(bytes(big)))
    assert len(box.udp) == 2
    dp.outbound(nets[ACCOUNT_A], memoryview(bytes(IP(bytes(big), flags="DF"))))
    assert dp.drops[DropReason.MTU] == 1
    icmp = IP(box.tun[ACCOUNT_A][-1])
    assert icmp.dst == "10.1.0.2" and icmp[ICMP].type == 3 and icmp[ICMP].code == 4
    assert icmp[ICMP].nexthopmtu == 1400
    v6 = IPv6(src="fd00:1::2", dst="fd00:2::1") / UDP() / (b"z" * 1500)
    dp.apply(route(2, "fd00:2::/64", 1).key, route(2, "fd00:2::/64", 1))
    dp.outbound(nets[ACCOUNT_A], memoryview(bytes(v6)))
    assert dp.drops[DropReason.MTU] == 2
    assert IPv6(box.tun[ACCOUNT_A][-1]).nh == 58  # ICMPv6 packet too big


def test_mss_clamped_on_syn_both_ways() -> None:
    dp, box, nets = make(*BASE)
    syn = IP(src="10.1.0.2", dst="10.2.0.9") / TCP(flags="S", options=[("MSS", 1460)])
    dp.outbound(nets[ACCOUNT_A], memoryview(bytearray(bytes(syn))))
    data, _ = box.udp[0]
    wrapped = IP(bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=50) / data))
    inner = scapy_sa(OUT, "192.0.2.1", "198.51.100.2").decrypt(wrapped)
    assert dict(inner[TCP].options)["MSS"] == 1360  # tunnel MTU 1400 - 40
    s = scapy_sa(IN, "198.51.100.2", "192.0.2.1")
    synack = IP(src="10.2.0.9", dst="10.1.0.2") / TCP(flags="SA", options=[("MSS", 1460)])
    dp.inbound_esp(memoryview(bytes(s.encrypt(synack)[ESP])))
    got = IP(box.tun[ACCOUNT_A][-1])
    assert dict(got[TCP].options)["MSS"] == 1360
    written = got[TCP].chksum
    del got[TCP].chksum  # scapy recomputes it: the clamp kept the checksum right
    assert IP(bytes(got))[TCP].chksum == written


@pytest.mark.parametrize("ext", ["dest", "hop+dest"])
def test_mss_clamped_on_ipv6_syn_behind_extension_headers(ext: str) -> None:
    """RFC 8200 §4: a SYN may sit behind Hop-by-Hop / Destination Options
    headers; it is clamped all the same (tunnel MTU 1400 - 60)."""
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    dp, box, nets = make(*BASE, route(2, "fd00:2::/64", 1))
    exts = IPv6ExtHdrDestOpt() if ext == "dest" else IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    syn = (
        IPv6(src="fd00:1::2", dst="fd00:2::9") / exts
        / TCP(flags="S", seq=0, options=[("MSS", 1440)])
    )  # fmt: skip
    dp.outbound(nets[ACCOUNT_A], memoryview(bytes(syn)))
    data, _ = box.udp[-1]
    wrapped = IP(bytes(IP(src="192.0.2.1", dst="198.51.100.2", proto=50) / data))
    inner = scapy_sa(OUT, "192.0.2.1", "198.51.100.2").decrypt(wrapped)
    assert dict(inner[TCP].options)["MSS"] == 1340
    s = scapy_sa(IN, "198.51.100.2", "192.0.2.1")
    synack = (
        IPv6(src="fd00:2::9", dst="fd00:1::2") / exts
        / TCP(flags="SA", seq=0, options=[("MSS", 1440)])
    )  # fmt: skip
    dp.inbound_esp(memoryview(bytes(s.encrypt(synack)[ESP])))
    got = IPv6(box.tun[ACCOUNT_A][-1])
    assert dict(got[TCP].options)["MSS"] == 1340
    written = got[TCP].chksum
    del got[TCP].chksum  # scapy recomputes it over the pseudo-header
    assert IPv6(bytes(got))[TCP].chksum == written


def test_rekey_moves_outbound_to_newest_generation_and_deletes_fall_back() -> None:
    new = sa(0x2002, Direction.OUT, generation=1, created=2000.0)
    dp, box, nets = make(*BASE, new)
    pkt = memoryview(bytes(IP(src="10.1.0.2", dst="10.2.0.9") / ICMP()))
    dp.outbound(nets[ACCOUNT_A], pkt)
    assert int.from_bytes(box.esp[-1][0][:4]) == 0x2002
    dp.remove(new.key)
    dp.outbound(nets[ACCOUNT_A], pkt)
    assert int.from_bytes(box.udp[-1][0][:4]) == 0x2001
    dp.remove(OUT.key)
    dp.outbound(nets[ACCOUNT_A], pkt)
    assert dp.drops[DropReason.NO_ROUTE] == 1  # tunnel down: its route withdrawn


def test_ecmp_spreads_flows_over_equal_priority_tunnels() -> None:
    dp, box, nets = make(
        tunnel(1, kind=TunnelKind.GRE, remote="203.0.113.1"),
        tunnel(2, kind=TunnelKind.GRE, remote="203.0.113.2"),
        route(1, "10.2.0.0/24", 1),
        route(2, "10.2.0.0/24", 2),
    )
    for port in range(200):
        pkt = IP(src="10.1.0.2", dst="10.2.0.9") / UDP(sport=1000 + port, dport=53)
        dp.outbound(nets[ACCOUNT_A], memoryview(bytes(pkt)))
        dp.outbound(nets[ACCOUNT_A], memoryview(bytes(pkt)))
        assert box.gre[-1][1] == box.gre[-2][1]  # one flow, one tunnel
    spread = {a for _, a in box.gre}
    assert spread == {("203.0.113.1", 0), ("203.0.113.2", 0)}


@pytest.mark.parametrize(
    "garbage", [b"", b"\x00\x00\x10\x01", b"\x00\x00\x10\x01" + bytes(8), bytes(100)]
)
def test_garbage_is_counted_never_raised(garbage: bytes) -> None:
    dp, box, nets = make(*BASE)
    dp.inbound_esp(memoryview(garbage))
    dp.inbound_gre(memoryview(garbage), "192.0.2.1", "198.51.100.2")
    dp.outbound(nets[ACCOUNT_A], memoryview(garbage))
    assert sum(dp.drops.values()) == 3
    assert box.tun[ACCOUNT_A] == [] and not box.esp and not box.udp


def test_replay_protected_tunnel_hands_off_to_the_owner_only() -> None:
    from dataclasses import replace

    from dataplane.worker import rendezvous_owner

    t = replace(tunnel(1), replay_protection=True)
    dp, box, nets = make(t, route(1, "10.2.0.0/24", 1), IN, OUT)
    handed: list[tuple[str, int, bytes]] = []
    dp.handoff = lambda acct, owner, pkt: handed.append((acct, owner, bytes(pkt)))
    dp.live = (0, 1, 2)
    owner = rendezvous_owner(OUT.spi, dp.live)
    pkt = memoryview(bytes(IP(src="10.1.0.2", dst="10.2.0.9") / ICMP()))
    dp.me = (owner + 1) % 3
    dp.outbound(nets[ACCOUNT_A], pkt)
    assert handed == [(ACCOUNT_A, owner, bytes(pkt))] and not box.udp
    dp.outbound(nets[ACCOUNT_A], pkt, False)  # a handed packet is never handed again
    assert len(handed) == 1 and len(box.udp) == 1
    dp.me = owner
    dp.outbound(nets[ACCOUNT_A], pkt)
    assert len(handed) == 1 and len(box.udp) == 2
    # owners are spread and stable: removing a non-owner moves nothing
    owners = {spi: rendezvous_owner(spi, (0, 1, 2)) for spi in range(0x1000, 0x1400)}
    assert set(owners.values()) == {0, 1, 2}
    for spi, o in owners.items():
        if o != 2:
            assert rendezvous_owner(spi, (0, 1)) == o


def test_outer_ecn_ce_propagates_or_drops_per_rfc6040() -> None:
    dp, box, _ = make(*BASE)
    s = scapy_sa(IN, "198.51.100.2", "192.0.2.1")
    ect = IP(src="10.2.0.9", dst="10.1.0.2", tos=0x02) / ICMP()  # ECT(0)
    dp.inbound_esp(memoryview(bytes(s.encrypt(ect)[ESP])), outer_tos=0x03)  # outer CE
    got = IP(box.tun[ACCOUNT_A][-1])
    assert got.tos & 3 == 3
    csum = got.chksum
    del got.chksum
    assert IP(bytes(got)).chksum == csum  # header checksum fixed up
    not_ect = IP(src="10.2.0.9", dst="10.1.0.2", tos=0) / ICMP()
    dp.inbound_esp(memoryview(bytes(s.encrypt(not_ect)[ESP])), outer_tos=0x03)
    assert dp.drops[DropReason.ECN] == 1 and len(box.tun[ACCOUNT_A]) == 1
