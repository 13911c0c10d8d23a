"""The GRE share filter spreads one tunnel over a node's workers by INNER flow.

Two raw GRE sockets in a namespace of ours, each with the classic BPF share
filter of one of two workers (``sockets.attach_share_filter``); GRE packets
built with scapy (IPv4/IPv6 inner, TCP/UDP, fragments, every GRE option
combination, malformed ones) come from a peer namespace through the kernel.
Every packet must reach exactly one socket, every inner flow one socket only,
in its sending order, and both sockets must get flows of the one tunnel.
"""

from __future__ import annotations

import select
import socket
import struct
import time

import pytest

from dataplane import sockets
from dataplane.tun import in_netns

pytestmark = pytest.mark.netns

SRC, DST = "10.77.0.1", "10.77.0.2"


def _gre(
    proto: int, *, csum: bool = False, key: int | None = None, seq: int | None = None
) -> bytes:
    flags = (
        (0x80 if csum else 0) | (0x20 if key is not None else 0) | (0x10 if seq is not None else 0)
    )
    hdr = struct.pack("!BBH", flags, 0, proto)
    if csum:
        hdr += b"\x00\x00\x00\x00"  # the filter only needs the field's room
    if key is not None:
        hdr += struct.pack("!I", key)
    if seq is not None:
        hdr += struct.pack("!I", seq)
    return hdr


def _options(i: int) -> dict[str, object]:
    """A different GRE option combination for every packet (offsets vary)."""
    return [
        {},
        {"key": 7},
        {"key": 7, "seq": i},
        {"csum": True, "key": 7, "seq": i},
        {"csum": True},
        {"seq": i},
    ][i % 6]


def _expected_rank(src: str, dst: str, sport: int, dport: int, count: int) -> int:
    """The documented hash, computed independently of the BPF program."""
    a = int.from_bytes(socket.inet_aton(src), "big")
    b = int.from_bytes(socket.inet_aton(dst), "big")
    key = a ^ b ^ ((sport << 16) | dport)
    return (((key * 0x9E3779B1) & 0xFFFFFFFF) >> 16) % count


def test_gre_share_by_inner_flow(netns_topology) -> None:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw

    topo = netns_topology("awt-p-gre")
    a, b = topo.namespace("a"), topo.namespace("b")
    topo.veth(a, "v", b, "v", addr_a=f"{SRC}/24", addr_b=f"{DST}/24")
    with in_netns(b.name):
        rx = [sockets.open_raw(sockets.IPPROTO_GRE, DST) for _ in range(2)]
    with in_netns(a.name):
        tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, sockets.IPPROTO_GRE)
    try:
        for rank, sk in enumerate(rx):
            sockets.attach_share_filter(sk, sockets.IPPROTO_GRE, rank, 2)

        sent: list[tuple[str, int]] = []  # (flow, packet id) in sending order
        expect: dict[str, int] = {}
        pid = 0

        def send(flow: str, gre_proto: int, inner: bytes, **opts: object) -> None:
            nonlocal pid
            sent.append((flow, pid))
            tx.sendto(_gre(gre_proto, **opts) + inner, (DST, 0))  # type: ignore[arg-type]
            pid += 1

        def marker() -> bytes:
            return b"<id:%06d>" % pid

        for i in range(12):  # one tunnel, 12 inner TCP flows, 6 packets each
            for j in range(6):
                inner = IP(src="10.1.0.2", dst="10.2.0.1") / TCP(sport=40000 + i, dport=5201)
                send(f"tcp{i}", 0x0800, bytes(inner / Raw(marker())), **_options(i + j))
            expect[f"tcp{i}"] = _expected_rank("10.1.0.2", "10.2.0.1", 40000 + i, 5201, 2)
        for i in range(6):  # IPv6 inner UDP flows
            for j in range(4):
                inner6 = IPv6(src="fd00:1::2", dst="fd00:2::1") / UDP(sport=50000 + i, dport=53)
                send(f"udp6-{i}", 0x86DD, bytes(inner6 / Raw(marker())), **_options(j))
        for j in range(3):  # IPv4 fragments of one datagram: addresses only
            frag = IP(src="10.1.0.9", dst="10.2.0.1", proto=17, flags="MF", frag=j * 10)
            send("frags", 0x0800, bytes(frag / Raw(marker() + bytes(72))), **_options(j))
        # not hashable by inner flow: each still goes to exactly one socket
        send("short", 0x0800, b"")  # GRE header only
        send("notip", 0x6558, marker() + bytes(30))  # transparent Ethernet bridging
        # TCP claimed, the packet ends before the ports: no load past the end
        send("trunc", 0x0800, bytes(IP(src="10.1.0.2", dst="10.2.0.1", proto=6)) + b"\x9c\x40")
        routing = b"\x40\x00\x08\x00" + marker()  # RFC 1701 routing bit
        sent.append(("routing", pid))
        tx.sendto(routing, (DST, 0))
        pid += 1

        ids = {f: p for f, p in sent}
        by_len = {20 + 4: ids["short"], 20 + 4 + 22: ids["trunc"]}
        got: list[list[int]] = [[], []]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sum(map(len, got)) < len(sent):
            ready, _, _ = select.select(rx, [], [], 0.2)
            for sk in ready:
                while True:
                    try:
                        data = sk.recv(4096)
                    except BlockingIOError:
                        break
                    at = data.find(b"<id:")
                    if at >= 0:
                        got[rx.index(sk)].append(int(data[at + 4 : at + 10]))
                    elif len(data) in by_len:  # the two packets without a marker
                        got[rx.index(sk)].append(by_len[len(data)])
    finally:
        for sk in (*rx, tx):
            sk.close()

    where = {p: r for r, ids in enumerate(got) for p in ids}
    all_ids = [p for _, p in sent]
    assert sorted(p for ids in got for p in ids) == all_ids, "each packet exactly once"
    flows: dict[str, list[int]] = {}
    for flow, p in sent:
        flows.setdefault(flow, []).append(p)
    for flow, ids in flows.items():
        ranks = {where[p] for p in ids}
        assert len(ranks) == 1, f"{flow} split over workers"
        (r,) = ranks
        assert [p for p in got[r] if p in ids] == ids, f"{flow} reordered"
        if flow in expect:
            assert r == expect[flow], f"{flow}: hash differs from the documented one"
    tcp_ranks = {where[flows[f"tcp{i}"][0]] for i in range(12)}
    assert tcp_ranks == {0, 1}, "one GRE tunnel's flows must spread over both workers"
    v6_ranks = {where[flows[f"udp6-{i}"][0]] for i in range(6)}
    assert v6_ranks == {0, 1}


def test_gre_inner_program_per_rank() -> None:
    """Rank and count land in the program's last compare (the rest is shared)."""
    p0, p1 = sockets.gre_inner_flow_program(0, 3), sockets.gre_inner_flow_program(2, 3)
    assert len(p0) == len(p1) < 256
    diff = [i for i, (x, y) in enumerate(zip(p0, p1, strict=True)) if x != y]
    assert len(diff) == 1 and p1[diff[0]][3] == 2
