"""tun.GsoTunWriter: in-order TCP segments written as one virtio_net_hdr GSO packet.

The unit part checks what is written (through a pipe) against scapy: one
packet with the merged payload, a valid IPv4 header checksum, the GSO fields,
and the flow order kept around packets that are not merged. The netns part
is the kernel's verdict: a TUN queue with IFF_VNET_HDR in a namespace of ours,
a real TCP listener behind it, and a peer we play through the TUN with scapy
(handshake, then 11 segments through the writer): the listener must receive
every byte, in order, and the kernel's ACK must cover them all.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from dataplane import tun

VNET = struct.Struct("<BBHHHH")


def _seg(seq: int, payload: bytes, flags: str = "A", sport: int = 40000, ack: int = 1) -> bytes:
    from scapy.layers.inet import IP, TCP

    p = IP(src="10.9.0.2", dst="10.9.0.1", id=seq & 0xFFFF) / TCP(
        sport=sport, dport=5555, seq=seq, ack=ack, flags=flags, window=1000
    )
    return bytes(p / payload)


def _writes(fd_r: int) -> list[bytes]:
    out = []
    while True:
        r, _, _ = select.select([fd_r], [], [], 0.05)
        if not r:
            return out
        out.append(os.read(fd_r, 70000))


def test_merges_in_order_segments_and_keeps_flow_order() -> None:
    from scapy.layers.inet import IP, TCP

    r, w = os.pipe()
    errors: list[int] = []
    try:
        wr = tun.GsoTunWriter(w, lambda: errors.append(1))
        wr.write(memoryview(_seg(1000, b"a" * 100)))
        wr.write(memoryview(_seg(1100, b"b" * 100)))
        wr.write(memoryview(_seg(1200, b"c" * 60)))  # shorter: last of the merge
        wr.write(memoryview(_seg(5000, b"x" * 100, sport=40001)))  # other flow, pending
        wr.write(memoryview(_seg(5100, b"", flags="FA", sport=40001)))  # FIN: flushes it first
        wr.write(memoryview(_seg(1260, b"d" * 100)))
        wr.write(memoryview(_seg(9999, b"e" * 100)))  # out of order: d goes alone first
        wr.flush()
        chunks = [_writes(r)][0]
    finally:
        os.close(r)
        os.close(w)
    # a pipe keeps write boundaries only by chance; parse the stream
    data = b"".join(chunks)
    pkts = []
    while data:
        hdr = VNET.unpack_from(data)
        total = struct.unpack_from("!H", data, 12)[0]
        pkts.append((hdr, IP(data[10 : 10 + total])))
        data = data[10 + total :]
    assert not errors
    assert [bytes(p[TCP].payload)[:1] for _, p in pkts] == [b"a", b"x", b"", b"d", b"e"]
    (flags, gso, hlen, size, start, off), merged = pkts[0]
    assert (flags, gso, hlen, size, start, off) == (1, 1, 40, 100, 20, 16)
    assert bytes(merged[TCP].payload) == b"a" * 100 + b"b" * 100 + b"c" * 60
    assert merged.len == 40 + 260
    rebuilt = IP(bytes(merged))
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == merged.chksum  # the header checksum is valid
    for hdr, _p in pkts[1:]:
        assert hdr == (0, 0, 0, 0, 0, 0)  # sent as they came


@pytest.mark.netns
def test_kernel_accepts_merged_writes(netns_topology) -> None:
    from scapy.layers.inet import IP, TCP

    topo = netns_topology("awt-p-tun")
    ns = topo.namespace("a")
    fd = tun.open_queue("awgso0", netns_name=ns.name, multi_queue=False, vnet_hdr=True)
    srv = conn = None
    try:
        tun.TunConfig("awgso0", netns_name=ns.name).apply(mtu=1500, addresses=["10.9.0.1/24"])
        with tun.in_netns(ns.name):
            srv = socket.socket()
            srv.bind(("10.9.0.1", 5555))
            srv.listen(1)
            srv.settimeout(3)

        def read_tcp(timeout: float = 2.0) -> IP:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if select.select([fd], [], [], 0.1)[0]:
                    p = IP(os.read(fd, 70000)[10:])
                    if p.haslayer(TCP) and p[TCP].sport == 5555:
                        return p
            raise AssertionError("no TCP packet from the listener")

        wr = tun.GsoTunWriter(fd, lambda: None)
        wr.write(memoryview(_seg(100, b"", flags="S", ack=0)))
        synack = read_tcp()
        assert synack[TCP].flags == "SA"
        ack = synack[TCP].seq + 1
        wr.write(memoryview(_seg(101, b"", flags="A", ack=ack)))
        conn, _ = srv.accept()
        conn.settimeout(3)
        payload = bytes(range(256)) * 40  # 10240 octets in 11 segments
        seq, chunks = 101, [payload[i : i + 1000] for i in range(0, len(payload), 1000)]
        sent = b""
        for c in chunks[:-1]:
            wr.write(memoryview(_seg(seq, c, ack=ack)))
            seq += len(c)
            sent += c
        wr.write(memoryview(_seg(seq, chunks[-1], flags="PA", ack=ack)))
        seq += len(chunks[-1])
        sent += chunks[-1]
        wr.flush()
        assert wr.merged >= len(chunks) - 1  # they really went out merged
        got = b""
        while len(got) < len(sent):
            part = conn.recv(65536)
            assert part, "connection closed early"
            got += part
        assert got == sent
        # the kernel ACKs everything we wrote (the last ACK may take a moment)
        deadline = time.monotonic() + 2
        last = 0
        while last != seq and time.monotonic() < deadline:
            with_ack = read_tcp(1.0)
            last = with_ack[TCP].ack
        assert last == seq
    finally:
        for s in (conn, srv):
            if s is not None:
                s.close()
        os.close(fd)
