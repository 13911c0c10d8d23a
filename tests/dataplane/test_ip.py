"""Outer headers, flows, ECN and path-MTU helpers, checked against scapy."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPerror,
    IPOption_LSRR,
    IPOption_RR,
    IPOption_Security,
    UDPerror,
    defragment,
)
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    in6_chksum,
)
from scapy.layers.ipsec import AH
from scapy.utils import checksum as scapy_checksum

from dataplane import ip
from dataplane.drops import Drop, DropReason

A4 = ipaddress.ip_address("192.0.2.1").packed
B4 = ipaddress.ip_address("198.51.100.7").packed
A6 = ipaddress.ip_address("2001:db8::1").packed
B6 = ipaddress.ip_address("2001:db8:ffff::2").packed


def rechecked(pkt: IP | IPv6, layer: type) -> tuple[int, int]:
    """(checksum on the wire, checksum scapy computes itself) for ``layer``."""
    name = next(f.name for f in layer.fields_desc if f.name in ("chksum", "cksum"))
    wire = getattr(pkt[layer], name)
    fresh = pkt.copy()
    delattr(fresh[layer], name)
    return wire, getattr(pkt.__class__(raw(fresh))[layer], name)


# -- checksums -----------------------------------------------------------------


def test_rfc1071_example() -> None:
    # RFC 1071 §3: words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries)
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ip.ones_sum(data) == 0xDDF2
    assert ip.internet_checksum(data) == 0x220D
    assert ip.internet_checksum(b"") == 0xFFFF
    assert ip.internet_checksum(b"\xff\xff") == 0x0000


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1600))
def test_checksum_matches_scapy(data: bytes) -> None:
    assert ip.internet_checksum(data) == scapy_checksum(data)
    assert ip.internet_checksum(memoryview(bytearray(data))) == scapy_checksum(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=64), st.data())
def test_rfc1624_incremental_update_equals_recompute(data: bytes, draw: st.DataObject) -> None:
    buf = bytearray(data[: len(data) & ~1]) + b"\x00\x00"  # checksum field at the end
    struct.pack_into("!H", buf, len(buf) - 2, ip.internet_checksum(buf))
    pos = draw.draw(st.integers(0, (len(data) // 2) - 1)) * 2
    new = draw.draw(st.integers(0, 0xFFFF))
    old = struct.unpack_from("!H", buf, pos)[0]
    struct.pack_into("!H", buf, pos, new)
    csum = struct.unpack_from("!H", buf, len(buf) - 2)[0]
    struct.pack_into("!H", buf, len(buf) - 2, ip.checksum_replace16(csum, old, new))
    # verifies like a freshly computed one (RFC 1624 §3: eqn 3 never yields
    # the -0 that a receiver would reject, unless all data is zero)
    assert ip.internet_checksum(buf) == 0 or not any(buf[:-2])


# -- outer headers -------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=200),
    ttl=st.integers(1, 255),
    tos=st.integers(0, 255),
    df=st.booleans(),
    ident=st.integers(0, 0xFFFF),
    proto=st.sampled_from([ip.IPPROTO_ESP, ip.IPPROTO_GRE, ip.IPPROTO_UDP]),
)
def test_ipv4_header_scapy(
    payload: bytes, ttl: int, tos: int, df: bool, ident: int, proto: int
) -> None:
    out = bytearray(300)
    n = ip.write_ipv4_header(
        out, 4, src=A4, dst=B4, proto=proto, payload_len=len(payload), ttl=ttl, tos=tos, df=df,
        ident=ident,
    )  # fmt: skip
    assert n == 20
    out[24 : 24 + len(payload)] = payload
    pkt = IP(bytes(out[4 : 24 + len(payload)]))
    assert (pkt.version, pkt.ihl, pkt.len) == (4, 5, 20 + len(payload))
    assert (pkt.ttl, pkt.tos, pkt.id, pkt.proto) == (ttl, tos, ident, proto)
    assert df == pkt.flags.DF and not pkt.flags.MF and pkt.frag == 0
    assert (pkt.src, pkt.dst) == ("192.0.2.1", "198.51.100.7")
    wire, fresh = rechecked(pkt, IP)
    assert wire == fresh
    assert ip.internet_checksum(out[4:24]) == 0


def test_ipv4_udp_outer_for_esp_in_udp() -> None:
    esp = b"\x00\x00\x12\x34" + b"\x00\x00\x00\x01" + b"e" * 40
    out = bytearray(100)
    off = ip.write_ipv4_header(
        out, 0, src=A4, dst=B4, proto=ip.IPPROTO_UDP, payload_len=8 + len(esp)
    )
    off += ip.write_udp_header(out, off, sport=4500, dport=4500, payload_len=len(esp))
    out[off : off + len(esp)] = esp
    pkt = IP(bytes(out[: off + len(esp)]))
    assert pkt[UDP].sport == 4500 and pkt[UDP].dport == 4500
    assert pkt[UDP].len == 8 + len(esp)
    assert pkt[UDP].chksum == 0  # RFC 3948 §2.1
    assert raw(pkt[UDP].payload) == esp
    assert rechecked(pkt, IP)[0] == rechecked(pkt, IP)[1]
    # the optional checksum, when wanted, is the one scapy computes
    ip.set_udp_checksum(out, 20, 8 + len(esp), A4, B4)
    pkt = IP(bytes(out[: off + len(esp)]))
    wire, fresh = rechecked(pkt, UDP)
    assert wire == fresh != 0


@settings(max_examples=100, deadline=None)
@given(
    payload=st.binary(max_size=300),
    tclass=st.integers(0, 255),
    flow=st.integers(0, 0xFFFFF),
    hlim=st.integers(0, 255),
)
def test_ipv6_header_and_udp_checksum_scapy(
    payload: bytes, tclass: int, flow: int, hlim: int
) -> None:
    out = bytearray(400)
    off = ip.write_ipv6_header(
        out, 0, src=A6, dst=B6, next_header=ip.IPPROTO_UDP, payload_len=8 + len(payload),
        hop_limit=hlim, tclass=tclass, flow_label=flow,
    )  # fmt: skip
    off += ip.write_udp_header(out, off, sport=4500, dport=1234, payload_len=len(payload))
    out[off : off + len(payload)] = payload
    ip.set_udp_checksum(out, 40, 8 + len(payload), A6, B6)
    pkt = IPv6(bytes(out[: off + len(payload)]))
    assert (pkt.version, pkt.tc, pkt.fl, pkt.hlim, pkt.nh) == (6, tclass, flow, hlim, 17)
    assert pkt.plen == 8 + len(payload)
    assert (pkt.src, pkt.dst) == ("2001:db8::1", "2001:db8:ffff::2")
    wire, fresh = rechecked(pkt, UDP)
    assert wire == fresh


def test_oversize_and_bad_addresses() -> None:
    out = bytearray(60)
    with pytest.raises(Drop) as e:
        ip.write_ipv4_header(out, 0, src=A4, dst=B4, proto=50, payload_len=65516)
    assert e.value.reason is DropReason.MTU
    with pytest.raises(Drop):
        ip.write_ipv6_header(out, 0, src=A6, dst=B6, next_header=50, payload_len=65536)
    with pytest.raises(ValueError):
        ip.write_ipv4_header(out, 0, src=A6, dst=B4, proto=50, payload_len=0)


# -- flows ---------------------------------------------------------------------


def v4int(s: str) -> int:
    return int(ipaddress.ip_address(s))


@pytest.mark.parametrize(
    ("pkt", "flow"),
    [
        (
            IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=443),
            (4, "10.0.0.1", "10.0.0.2", 6, 40000, 443),
        ),
        (
            IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption_RR()]) / UDP(sport=5, dport=53),
            (4, "10.0.0.1", "10.0.0.2", 17, 5, 53),
        ),
        (IP(src="1.2.3.4", dst="5.6.7.8") / ICMP(), (4, "1.2.3.4", "5.6.7.8", 1, 0, 0)),
        (  # non-first fragment: what follows is not a header
            IP(src="1.2.3.4", dst="5.6.7.8", frag=10, proto=6) / (b"\x11" * 20),
            (4, "1.2.3.4", "5.6.7.8", 6, 0, 0),
        ),
        (  # first fragment: ports 0 too, so every piece hashes alike
            IP(src="1.2.3.4", dst="5.6.7.8", flags="MF") / UDP(sport=9, dport=9),
            (4, "1.2.3.4", "5.6.7.8", 17, 0, 0),
        ),
        (
            IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1, dport=2),
            (6, "2001:db8::1", "2001:db8::2", 6, 1, 2),
        ),
        (
            IPv6(src="2001:db8::1", dst="2001:db8::2")
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrRouting(addresses=["2001:db8::9"])
            / IPv6ExtHdrDestOpt()
            / UDP(sport=4500, dport=4501),
            (6, "2001:db8::1", "2001:db8::2", 17, 4500, 4501),
        ),
        (
            IPv6(src="::1", dst="::2")
            / AH(nh=6, payloadlen=4, icv=b"\0" * 12)
            / TCP(sport=7, dport=8),
            (6, "::1", "::2", 6, 7, 8),
        ),
        (  # atomic fragment (offset 0, M 0): the ports are there
            IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(offset=0, m=0) / UDP(sport=3, dport=4),
            (6, "::1", "::2", 17, 3, 4),
        ),
        (
            IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(offset=0, m=1) / UDP(sport=3, dport=4),
            (6, "::1", "::2", 17, 0, 0),
        ),
        (
            IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(offset=100, m=0, nh=6) / (b"\0" * 8),
            (6, "::1", "::2", 6, 0, 0),
        ),
        (IPv6(src="::1", dst="::2", nh=59), (6, "::1", "::2", 59, 0, 0)),
        (IPv6(src="::1", dst="::2") / ICMPv6EchoRequest(), (6, "::1", "::2", 58, 0, 0)),
    ],
    ids=lambda v: v.summary() if hasattr(v, "summary") else "",
)
def test_parse_flow(pkt: IP | IPv6, flow: tuple[int, str, str, int, int, int]) -> None:
    version, src, dst, proto, sport, dport = flow
    got = ip.parse_flow(raw(pkt))
    assert got == ip.Flow(version, v4int(src), v4int(dst), proto, sport, dport)
    # trailing bytes beyond the IP length (Ethernet padding) do not matter
    assert ip.parse_flow(raw(pkt) + b"\0" * 6) == got


def test_parse_flow_bounds_the_extension_walk() -> None:
    chain = IPv6(src="::1", dst="::2")
    for _ in range(12):
        chain = chain / IPv6ExtHdrDestOpt()
    got = ip.parse_flow(raw(chain / UDP(sport=1, dport=2)))
    assert (got.sport, got.dport) == (0, 0)


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x45" + b"\0" * 18,  # short IPv4 header
        raw(IP() / TCP())[:22],  # IP length says 40, 22 present
        bytes([0x44]) + raw(IP())[1:],  # IHL 4
        raw(IPv6() / UDP())[:39],
        raw(IPv6(plen=100) / UDP()),  # payload length past the end
        raw(IPv6() / IPv6ExtHdrHopByHop())[:41] + b"",
        b"\x50" + b"\0" * 40,  # version 5
        raw(IP(len=22, proto=17) / b"ab"),  # UDP ports cut off
    ],
)
def test_parse_flow_malformed(wire: bytes) -> None:
    with pytest.raises(Drop) as e:
        ip.parse_flow(wire)
    assert e.value.reason is DropReason.MALFORMED


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_parse_flow_random_bytes(data: bytes) -> None:
    for prefix in (b"\x45", b"\x60", b""):
        try:
            flow = ip.parse_flow(prefix + data)
        except Drop:
            continue
        assert flow.version in (4, 6) and 0 <= flow.sport < 65536


# -- ECN, RFC 6040 ---------------------------------------------------------------

N, E0, E1, CE = "Not-ECT", "ECT(0)", "ECT(1)", "CE"
CODE = {N: 0b00, E1: 0b01, E0: 0b10, CE: 0b11}
# RFC 6040 §4.2 Figure 4, transcribed row by row (inner) with the outer
# columns in the RFC's order Not-ECT, ECT(0), ECT(1), CE. None = drop.
FIGURE_4 = {
    N: (N, N, N, None),
    E0: (E0, E0, E1, CE),
    E1: (E1, E1, E1, CE),
    CE: (CE, CE, CE, CE),
}


@pytest.mark.parametrize("inner", FIGURE_4)
@pytest.mark.parametrize("dscp", [0, 46])
def test_rfc6040_decap_table(inner: str, dscp: int) -> None:
    for outer, expect in zip((N, E0, E1, CE), FIGURE_4[inner], strict=True):
        got = ip.ecn_decap((0x28 << 2) | CODE[outer], (dscp << 2) | CODE[inner])
        if expect is None:
            assert got is None
        else:
            assert got == (dscp << 2) | CODE[expect], (inner, outer)


def test_rfc6040_encap_copies_ecn() -> None:
    for ecn in CODE.values():
        assert ip.ecn_encap((46 << 2) | ecn) == ecn  # normal mode, DSCP not copied
        assert ip.ecn_encap((46 << 2) | ecn, copy_dscp=True) == (46 << 2) | ecn


def test_apply_ecn_decap_rewrites_inner_headers() -> None:
    v4 = bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2", tos=(10 << 2) | 0b10) / UDP()))
    ip.apply_ecn_decap(v4, 0b11)  # outer CE over ECT(0): CE
    pkt = IP(bytes(v4))
    assert pkt.tos == (10 << 2) | 0b11
    assert rechecked(pkt, IP)[0] == rechecked(pkt, IP)[1]
    v6 = bytearray(raw(IPv6(tc=(10 << 2) | 0b01, fl=0xABCDE) / UDP()))
    ip.apply_ecn_decap(v6, 0b11)
    pkt6 = IPv6(bytes(v6))
    assert (pkt6.tc, pkt6.fl, pkt6.version) == ((10 << 2) | 0b11, 0xABCDE, 6)
    for not_ect in (
        bytearray(raw(IP(tos=0x20) / UDP())),
        bytearray(raw(IPv6(tc=0x20) / UDP())),
    ):
        before = bytes(not_ect)
        with pytest.raises(Drop) as e:
            ip.apply_ecn_decap(not_ect, 0b11)
        assert e.value.reason is DropReason.ECN
        assert not_ect == before
        ip.apply_ecn_decap(not_ect, 0b10)  # ECT(0) outer over Not-ECT: unchanged
        assert not_ect == before


# -- fragmentation ----------------------------------------------------------------


def reassemble(frags: list[bytes]) -> bytes:
    pkts = [IP(f) for f in frags]
    for p in pkts:
        wire, fresh = rechecked(p, IP)
        assert wire == fresh
    out = defragment(pkts)
    assert len(out) == 1
    return raw(out[0])


@pytest.mark.parametrize("mtu", [68, 576, 1000, 1280, 1476])
@pytest.mark.parametrize("size", [100, 1477, 3000, 9000])
def test_fragments_reassemble_in_scapy(mtu: int, size: int) -> None:
    orig = raw(IP(src="10.0.0.1", dst="10.9.0.1", id=4242) / UDP(sport=1, dport=2) / (b"z" * size))
    frags = ip.fragment_ipv4(orig, mtu)
    assert all(len(f) <= mtu for f in frags)
    if len(orig) <= mtu:
        assert frags == [orig]
        return
    assert len(frags) > 1
    for f in frags[:-1]:
        assert (len(f) - 20) % 8 == 0 and IP(f).flags.MF
    assert not IP(frags[-1]).flags.MF
    assert reassemble(frags) == orig


def test_options_copy_rule() -> None:
    opts = [
        IPOption_RR(routers=["1.1.1.1"]),
        IPOption_LSRR(routers=["2.2.2.2"]),
        IPOption_Security(),
    ]
    orig = raw(IP(src="10.0.0.1", dst="10.9.0.1", options=opts) / UDP() / (b"o" * 2000))
    frags = ip.fragment_ipv4(orig, 700)
    first, later = IP(frags[0]), [IP(f) for f in frags[1:]]
    assert [o.option for o in first.options if o.option] == [7, 3, 2]  # RR, LSRR, security
    for p in later:
        # RFC 791: record route (copy flag 0) only in the first fragment
        assert [o.copy_flag for o in p.options if o.option] == [1, 1]
        assert p.ihl * 4 < first.ihl * 4
    assert reassemble(frags) == orig


def test_fragmenting_a_fragment_keeps_base_offset_and_mf() -> None:
    orig = raw(IP(id=9, src="10.0.0.1", dst="10.0.0.2") / UDP() / (b"m" * 3000))
    big = ip.fragment_ipv4(orig, 1500)  # 1500, 1500, rest
    assert len(big) == 3
    small = [s for f in big for s in ip.fragment_ipv4(f, 576)]
    assert [bool(IP(s).flags.MF) for s in small] == [True] * (len(small) - 1) + [False]
    assert reassemble(small) == orig


def test_df_and_malformed() -> None:
    orig = raw(IP(flags="DF") / UDP() / (b"d" * 1500))
    with pytest.raises(Drop) as e:
        ip.fragment_ipv4(orig, 1400)
    assert e.value.reason is DropReason.MTU
    assert ip.fragment_ipv4(orig, 1528) == [orig]  # fits: DF does not matter
    bad_opts = bytearray(raw(IP(options=[IPOption_RR()]) / (b"x" * 200)))
    bad_opts[21] = 99  # option length past the header
    with pytest.raises(Drop) as e:
        ip.fragment_ipv4(bad_opts, 100)
    assert e.value.reason is DropReason.MALFORMED
    with pytest.raises(ValueError):
        ip.fragment_ipv4(orig, 67)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 4000), mtu=st.integers(68, 1600), nopts=st.integers(0, 2))
def test_fragment_property(size: int, mtu: int, nopts: int) -> None:
    opts = [IPOption_Security(), IPOption_RR(routers=["9.9.9.9"])][:nopts]
    orig = raw(IP(id=size, src="10.0.0.1", dst="10.0.0.2", options=opts) / (b"p" * size))
    frags = ip.fragment_ipv4(orig, mtu)
    assert all(len(f) <= mtu for f in frags)
    if len(frags) > 1:
        assert reassemble(frags) == orig
    else:
        assert frags == [orig]


# -- ICMP errors -----------------------------------------------------------------

GW4 = ipaddress.ip_address("100.64.0.1").packed
GW6 = ipaddress.ip_address("2001:db8:aaaa::1").packed


def test_icmp_frag_needed_scapy() -> None:
    orig = raw(
        IP(src="10.1.1.1", dst="10.2.2.2", flags="DF", id=5) / UDP(sport=7, dport=9) / (b"b" * 1472)
    )
    reply = IP(ip.icmp_frag_needed(orig, 1400, GW4))
    assert (reply.src, reply.dst, reply.proto) == ("100.64.0.1", "10.1.1.1", 1)
    assert (reply[ICMP].type, reply[ICMP].code, reply[ICMP].nexthopmtu) == (3, 4, 1400)
    assert rechecked(reply, IP)[0] == rechecked(reply, IP)[1]
    assert rechecked(reply, ICMP)[0] == rechecked(reply, ICMP)[1]
    # RFC 792: the offending header + 64 bits of its data
    assert raw(reply[ICMP].payload) == orig[:28]
    assert reply[IPerror].dst == "10.2.2.2" and reply[UDPerror].dport == 9
    assert reply.len == 20 + 8 + 28


def test_icmp_frag_needed_with_options_quotes_whole_header() -> None:
    orig = raw(IP(src="10.1.1.1", dst="10.2.2.2", options=[IPOption_RR()]) / TCP() / (b"c" * 9))
    reply = IP(ip.icmp_frag_needed(orig, 576, GW4))
    ihl = IP(orig).ihl * 4
    assert raw(reply[ICMP].payload) == orig[: ihl + 8]
    assert rechecked(reply, ICMP)[0] == rechecked(reply, ICMP)[1]


@pytest.mark.parametrize(
    "pkt",
    [
        IP(src="10.1.1.1", dst="10.2.2.2") / ICMP(type=3, code=1) / (b"e" * 28),  # error
        IP(src="10.1.1.1", dst="10.2.2.2") / ICMP(type=11) / (b"e" * 28),
        IP(src="10.1.1.1", dst="10.2.2.2", frag=100) / (b"f" * 30),  # non-first fragment
        IP(src="224.0.0.5", dst="10.2.2.2") / UDP(),  # multicast source
        IP(src="0.0.0.0", dst="10.2.2.2") / UDP(),
        IP(src="255.255.255.255", dst="10.2.2.2") / UDP(),
        IP(src="127.0.0.1", dst="10.2.2.2") / UDP(),
    ],
    ids=lambda p: p.summary(),
)
def test_no_icmp_error_where_rfc1122_forbids(pkt: IP) -> None:
    with pytest.raises(Drop) as e:
        ip.icmp_frag_needed(raw(pkt), 1400, GW4)
    assert e.value.reason is DropReason.MTU


def test_icmp_error_about_echo_is_fine() -> None:
    orig = raw(IP(src="10.1.1.1", dst="10.2.2.2", flags="DF") / ICMP(type=8) / (b"p" * 1500))
    assert IP(ip.icmp_frag_needed(orig, 1400, GW4))[ICMP].nexthopmtu == 1400


@pytest.mark.parametrize("size", [0, 100, 1400, 8000])
def test_icmpv6_packet_too_big_scapy(size: int) -> None:
    orig = raw(
        IPv6(src="2001:db8:1::5", dst="2001:db8:2::6") / UDP(sport=1, dport=2) / (b"v" * size)
    )
    wire = ip.icmpv6_packet_too_big(orig, 1400, GW6)
    assert len(wire) <= 1280  # RFC 4443 §2.4 (c)
    reply = IPv6(wire)
    assert (reply.src, reply.dst, reply.nh) == ("2001:db8:aaaa::1", "2001:db8:1::5", 58)
    ptb = reply[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1400)
    wire_sum, fresh_sum = rechecked(reply, ICMPv6PacketTooBig)
    assert wire_sum == fresh_sum
    assert in6_chksum(58, reply, wire[40:]) == 0  # scapy's pseudo-header sum
    quoted = raw(ptb.payload)
    assert quoted == orig[: len(quoted)]
    assert len(quoted) == min(len(orig), 1280 - 48)


@pytest.mark.parametrize(
    "pkt",
    [
        IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6DestUnreach() / (b"e" * 48),
        IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt() / ICMPv6PacketTooBig(),
        IPv6(src="ff02::1", dst="2001:db8::2") / UDP(),
        IPv6(src="::", dst="2001:db8::2") / UDP(),
    ],
    ids=lambda p: p.summary(),
)
def test_no_icmpv6_error_where_rfc4443_forbids(pkt: IPv6) -> None:
    with pytest.raises(Drop) as e:
        ip.icmpv6_packet_too_big(raw(pkt), 1280, GW6)
    assert e.value.reason is DropReason.MTU


def test_icmpv6_packet_too_big_for_multicast_destination_and_echo() -> None:
    # RFC 4443 §2.4 (e.3): Packet Too Big is the exception for multicast destinations
    for pkt in (
        IPv6(src="2001:db8::1", dst="ff0e::1") / UDP() / (b"m" * 1400),
        IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(data=b"m" * 1400),
    ):
        reply = IPv6(ip.icmpv6_packet_too_big(raw(pkt), 1300, GW6))
        assert reply[ICMPv6PacketTooBig].mtu == 1300


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.sampled_from([b"\x45", b"\x46", b"\x60"]))
def test_icmp_builders_on_garbage_only_raise_drop(data: bytes, prefix: bytes) -> None:
    for fn, src in ((ip.icmp_frag_needed, GW4), (ip.icmpv6_packet_too_big, GW6)):
        with contextlib.suppress(Drop):
            fn(prefix + data, 1280, src)
    with contextlib.suppress(Drop):
        ip.fragment_ipv4(prefix + data, 68)


# -- outer header parsing, property round trips ----------------------------------


def test_parse_ipv4_header_of_a_raw_socket_read() -> None:
    pkt = IP(src="203.0.113.9", dst="203.0.113.1", tos=0xB9, options=[IPOption_RR()]) / (b"g" * 30)
    pkt = IP(raw(pkt))
    wire = raw(pkt) + b"\0" * 4  # trailing bytes are not payload
    hlen, total, proto, tos, src, dst = ip.parse_ipv4_header(wire)
    assert (hlen, total, tos) == (pkt.ihl * 4, pkt.len, 0xB9)
    assert proto == pkt.proto
    assert (src, dst) == (v4int("203.0.113.9"), v4int("203.0.113.1"))
    assert wire[hlen:total] == b"g" * 30
    for bad in (wire[:19], raw(IPv6()), wire[: total - 1], b"\x44" + wire[1:]):
        with pytest.raises(Drop) as e:
            ip.parse_ipv4_header(bad)
        assert e.value.reason is DropReason.MALFORMED


ports = st.integers(0, 0xFFFF)


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    src=st.integers(0, 2**128 - 1),
    dst=st.integers(0, 2**128 - 1),
    proto=st.sampled_from([6, 17, 1, 47, 50]),
    sport=ports,
    dport=ports,
)
def test_parse_flow_round_trip(
    v6: bool, src: int, dst: int, proto: int, sport: int, dport: int
) -> None:
    if not v6:
        src, dst = src >> 96, dst >> 96
    l4 = {6: TCP(sport=sport, dport=dport), 17: UDP(sport=sport, dport=dport)}.get(proto, b"\0" * 8)
    if v6:
        pkt = IPv6(src=str(ipaddress.IPv6Address(src)), dst=str(ipaddress.IPv6Address(dst)))
        pkt.nh = proto
    else:
        pkt = IP(src=str(ipaddress.IPv4Address(src)), dst=str(ipaddress.IPv4Address(dst)))
        pkt.proto = proto
    flow = ip.parse_flow(raw(pkt / l4))
    has_ports = proto in (6, 17)
    assert flow == (6 if v6 else 4, src, dst, proto, sport * has_ports, dport * has_ports)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 255))
def test_apply_ecn_decap_on_garbage_only_raises_drop(data: bytes, outer: int) -> None:
    for prefix in (b"\x45", b"\x60", b""):
        with contextlib.suppress(Drop):
            ip.apply_ecn_decap(bytearray(prefix + data), outer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=90), st.integers(0, 200))
def test_ipv6_walk_never_reads_out_of_bounds(data: bytes, length: int) -> None:
    with contextlib.suppress(Drop):
        proto, off, _ = ip.ipv6_upper_layer(data, length)
        assert off >= 40 and 0 <= proto < 256
