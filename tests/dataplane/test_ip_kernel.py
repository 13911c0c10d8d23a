"""The Linux stack as the independent judge of our IP helpers.

A TUN device in a namespace of our own (prefix ``awt-ip-``) plays the worker's
inner side: what we write into it is received by a real kernel, which accepts
or rejects it by its own rules.

* ``icmp_frag_needed`` / ``icmpv6_packet_too_big``: the kernel lowers the path
  MTU of the sending socket to the value we reported (``IP_MTU`` /
  ``IPV6_MTU``), which it only does for a checksum-valid ICMP error that
  quotes a packet it really sent.
* ``fragment_ipv4``: the kernel reassembles our fragments and a UDP socket
  receives the original datagram.
* ``clamp_mss``: the kernel answers a clamped SYN (so the incrementally
  updated checksum is valid) and the accepted connection uses the clamped
  MSS; a SYN whose MSS was changed without fixing the checksum gets nothing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, TCP, UDP

from dataplane import gre, ip
from dataplane.mss import clamp_mss

pytestmark = pytest.mark.netns

TUN = "awip0"
HOST4, PEER4_NET, GW4 = "10.77.0.1", "10.78.0.0/16", "10.77.0.254"
HOST6, PEER6_NET, GW6 = "fd00:77::1", "fd00:78::/32", "fd00:77::fe"

IP_MTU = 14
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
IPV6_PMTUDISC_DO = 2


class Lab:
    def __init__(self, ns: Any, fd: int) -> None:
        self.ns = ns
        self.fd = fd

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        from dataplane.tun import in_netns

        with in_netns(self.ns.name):
            yield

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        with self.inside():
            return socket.socket(family, kind, proto)

    def wait_ipv6_usable(self, timeout: float = 3.0) -> None:
        """The address is listed at once, but the kernel finishes setting it
        up in a work queue (even without DAD): wait until it can be bound."""
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            probe = self.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                probe.bind((HOST6, 0))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            finally:
                probe.close()

    def write(self, packet: bytes) -> None:
        os.write(self.fd, packet)

    def read_until(self, match: Callable[[bytes], bool], timeout: float = 3.0) -> bytes | None:
        """The first packet the kernel sends into the TUN that ``match``es."""
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            try:
                pkt = os.read(self.fd, 65535)
            except BlockingIOError:
                continue
            if match(pkt):
                return pkt
        return None


@pytest.fixture
def lab(netns_topology: Callable[[str], Any]) -> Iterator[Lab]:
    from dataplane.tun import TunConfig, open_queue

    topo = netns_topology("awt-ip-")
    ns = topo.namespace("k")  # type: ignore[attr-defined]
    ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
    ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
    ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
    fd = open_queue(TUN, netns_name=ns.name, multi_queue=False)
    try:
        TunConfig(TUN, netns_name=ns.name).apply(
            mtu=1500,
            addresses=[f"{HOST4}/24", f"{HOST6}/64"],
            routes=[PEER4_NET, PEER6_NET],
        )
        lab = Lab(ns, fd)
        lab.wait_ipv6_usable()
        yield lab
    finally:
        os.close(fd)


def a4(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def test_kernel_applies_our_frag_needed(lab: Lab) -> None:
    sock = lab.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        sock.connect(("10.78.0.5", 9))
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1500
        sock.send(b"d" * 1400)
        sent = lab.read_until(
            lambda p: p[0] >> 4 == 4 and p[9] == 17 and p[16:20] == a4("10.78.0.5")
        )
        assert sent is not None and IP(sent).flags.DF
        lab.write(ip.icmp_frag_needed(sent, 1280, a4(GW4)))
        deadline = time.monotonic() + 2
        while sock.getsockopt(socket.IPPROTO_IP, IP_MTU) != 1280 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1280
        with pytest.raises(OSError):  # EMSGSIZE: the kernel now believes us
            sock.send(b"d" * 1400)


def test_kernel_applies_our_packet_too_big(lab: Lab) -> None:
    sock = lab.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)
        sock.connect(("fd00:78::5", 9))
        sock.send(b"6" * 1400)
        dst = ipaddress.ip_address("fd00:78::5").packed
        sent = lab.read_until(lambda p: p[0] >> 4 == 6 and p[6] == 17 and p[24:40] == dst)
        assert sent is not None
        lab.write(ip.icmpv6_packet_too_big(sent, 1300, ipaddress.ip_address(GW6).packed))
        deadline = time.monotonic() + 2
        while (
            sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) != 1300 and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU) == 1300


def test_kernel_reassembles_our_fragments(lab: Lab) -> None:
    sock = lab.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((HOST4, 7777))
        sock.settimeout(3)
        payload = bytes(range(256)) * 12
        dgram = raw(
            IP(src="10.78.0.9", dst=HOST4, id=0x4D2, ttl=30) / UDP(sport=5555, dport=7777) / payload
        )
        frags = ip.fragment_ipv4(dgram, 576)
        assert len(frags) == 6
        for f in reversed(frags):  # out of order on purpose
            lab.write(f)
        data, addr = sock.recvfrom(65535)
        assert data == payload and addr == ("10.78.0.9", 5555)


def syn(mss: int, sport: int) -> bytearray:
    tcp = TCP(sport=sport, dport=8080, flags="S", seq=1000, window=64240, options=[("MSS", mss)])
    return bytearray(raw(IP(src="10.78.0.9", dst=HOST4, ttl=30) / tcp))


def test_kernel_accepts_clamped_syn_and_uses_its_mss(lab: Lab) -> None:
    listener = lab.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST4, 8080))
        listener.listen(4)
        listener.settimeout(3)

        def synack_to(port: int) -> Callable[[bytes], bool]:
            def match(p: bytes) -> bool:
                if p[0] >> 4 != 4 or p[9] != 6:
                    return False
                t = IP(p)[TCP]
                return t.dport == port and t.flags == "SA"

            return match

        # Control: change the MSS without fixing the checksum -> silently dropped.
        broken = syn(1460, 40001)
        broken[42:44] = (1200).to_bytes(2, "big")
        lab.write(bytes(broken))
        assert lab.read_until(synack_to(40001), timeout=0.7) is None

        good = syn(1460, 40002)
        assert clamp_mss(good, 1200, 1200)
        lab.write(bytes(good))
        reply = lab.read_until(synack_to(40002))
        assert reply is not None, "kernel dropped our clamped SYN (bad checksum?)"
        r = IP(reply)[TCP]
        ack = IP(src="10.78.0.9", dst=HOST4, ttl=30) / TCP(
            sport=40002, dport=8080, flags="A", seq=1001, ack=r.seq + 1, window=64240
        )
        lab.write(raw(ack))
        conn, _ = listener.accept()
        with conn:
            # the connection's MSS toward us is what the clamped SYN announced
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == 1200


def test_kernel_accepts_our_outer_headers(lab: Lab) -> None:
    """Outer IPv4 (GRE, and UDP with checksum 0 as RFC 3948 sends it) and IPv6
    + UDP with our checksum reach the kernel's sockets; a corrupted IPv4
    header checksum does not."""
    raw_gre = lab.socket(socket.AF_INET, socket.SOCK_RAW, 47)
    udp4 = lab.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp6 = lab.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with raw_gre, udp4, udp6:
        udp4.bind((HOST4, 4500))
        udp6.bind((HOST6, 4500))
        for s in (raw_gre, udp4, udp6):
            s.settimeout(3)
        peer4, host4 = a4("10.78.0.9"), a4(HOST4)
        inner = raw(IP(src="192.168.1.1", dst="192.168.2.2") / UDP() / b"inner")

        def gre_packet(ident: int) -> bytearray:
            buf = bytearray(200)
            n = gre.encapsulate_into(buf, 20, inner, gre.ETH_P_IP, key=7)
            ip.write_ipv4_header(buf, 0, src=peer4, dst=host4, proto=47, payload_len=n,
                                 ident=ident, tos=ip.ecn_encap(0b10))  # fmt: skip
            return buf[: 20 + n]

        bad = gre_packet(1)
        bad[10] ^= 0xFF  # header checksum
        lab.write(bytes(bad))
        lab.write(bytes(gre_packet(2)))
        got = raw_gre.recv(2000)  # raw IPv4 sockets deliver the IP header too
        assert got[4:6] == b"\x00\x02", "the corrupted header must not be delivered"
        assert gre.decapsulate(got[20:]) == (gre.ETH_P_IP, 7, 8)
        assert got[28:] == inner

        esp = b"\x00\x00\x10\x01" + b"\x00\x00\x00\x01" + b"e" * 30
        buf = bytearray(28 + len(esp))
        ip.write_ipv4_header(buf, 0, src=peer4, dst=host4, proto=17, payload_len=8 + len(esp))
        ip.write_udp_header(buf, 20, sport=4501, dport=4500, payload_len=len(esp))
        buf[28:] = esp
        lab.write(bytes(buf))
        assert udp4.recvfrom(2000) == (esp, ("10.78.0.9", 4501))

        peer6 = ipaddress.ip_address("fd00:78::9").packed
        host6 = ipaddress.ip_address(HOST6).packed
        buf = bytearray(48 + len(esp))
        ip.write_ipv6_header(buf, 0, src=peer6, dst=host6, next_header=17,
                             payload_len=8 + len(esp), flow_label=0x12345)  # fmt: skip
        ip.write_udp_header(buf, 40, sport=4501, dport=4500, payload_len=len(esp))
        buf[48:] = esp
        zero = bytes(buf)  # checksum 0: IPv6 forbids it (RFC 8200 §8.1), dropped
        ip.set_udp_checksum(buf, 40, 8 + len(esp), peer6, host6)
        lab.write(zero)
        lab.write(bytes(buf))
        data, addr = udp6.recvfrom(2000)
        assert data == esp and addr[:2] == ("fd00:78::9", 4501)
        udp6.settimeout(0.3)
        with pytest.raises(TimeoutError):
            udp6.recvfrom(2000)  # and nothing else arrived (the zero-checksum one)
