"""TCP MSS clamping, checked by scapy's own parsing and checksum computation."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from dataplane.drops import Drop, DropReason
from dataplane.mss import clamp_mss, mss_for_mtu

V4_MAX, V6_MAX = 1360, 1340


def v4(flags: str = "S", options: list | None = None, payload: bytes = b"") -> bytearray:  # type: ignore[type-arg]
    opts = [("MSS", 1460)] if options is None else options
    tcp = TCP(sport=40000, dport=443, flags=flags, seq=1, ack=0, options=opts)
    return bytearray(raw(IP(src="10.0.0.1", dst="10.2.0.9") / tcp / payload))


def v6(flags: str = "S", options: list | None = None, ext: tuple = ()) -> bytearray:  # type: ignore[type-arg]
    opts = [("MSS", 1440)] if options is None else options
    pkt = IPv6(src="2001:db8::1", dst="2001:db8:9::2")
    for e in ext:
        pkt = pkt / e
    return bytearray(raw(pkt / TCP(sport=1, dport=22, flags=flags, options=opts)))


def mss_of(pkt: IP | IPv6) -> int | None:
    return dict(pkt[TCP].options).get("MSS")


def checksum_ok(wire: bytes | bytearray) -> bool:
    """Does scapy, recomputing the TCP checksum from scratch, agree with the wire?"""
    cls = IP if wire[0] >> 4 == 4 else IPv6
    pkt = cls(bytes(wire))
    fresh = pkt.copy()
    del fresh[TCP].chksum
    return pkt[TCP].chksum == cls(raw(fresh))[TCP].chksum


def test_ipv4_syn_1460_is_clamped() -> None:
    wire = v4()
    assert clamp_mss(wire, V4_MAX, V6_MAX) is True
    pkt = IP(bytes(wire))
    assert mss_of(pkt) == V4_MAX
    assert checksum_ok(wire)
    # idempotent: a second pass finds nothing to lower
    assert clamp_mss(wire, V4_MAX, V6_MAX) is False


def test_ipv4_syn_ack_with_payload_and_realistic_options() -> None:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 0)), ("NOP", None), ("WScale", 7)]
    wire = v4("SA", opts, payload=b"fast open data")
    assert clamp_mss(wire, V4_MAX, V6_MAX)
    pkt = IP(bytes(wire))
    assert mss_of(pkt) == V4_MAX and checksum_ok(wire)
    assert dict(pkt[TCP].options)["WScale"] == 7
    assert raw(pkt[TCP].payload) == b"fast open data"


@pytest.mark.parametrize(
    "opts",
    [
        [("NOP", None), ("MSS", 1460)],  # MSS value at an odd offset
        [("NOP", None), ("NOP", None), ("NOP", None), ("MSS", 1460)],  # odd kind, even value
        [("WScale", 7), ("MSS", 1460)],  # value at offset 25
        [("SAckOK", b""), ("NOP", None), ("MSS", 0xFFFF)],
        [("Timestamp", (1, 2)), ("NOP", None), ("MSS", 0x13FF)],
    ],
    ids=str,
)
def test_odd_positions_keep_the_checksum_right(opts: list) -> None:  # type: ignore[type-arg]
    for wire, limit in ((v4("S", opts), V4_MAX), (v6("S", opts), V6_MAX)):
        assert clamp_mss(wire, V4_MAX, V6_MAX)
        pkt = (IP if wire[0] >> 4 == 4 else IPv6)(bytes(wire))
        assert mss_of(pkt) == limit
        assert checksum_ok(wire)


def test_ipv6_syn_and_extension_headers() -> None:
    for ext in ((), (IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())):
        wire = v6("S", ext=ext)
        assert clamp_mss(wire, V4_MAX, V6_MAX)
        pkt = IPv6(bytes(wire))
        assert mss_of(pkt) == V6_MAX and checksum_ok(wire)


@pytest.mark.parametrize(
    "wire",
    [
        v4("A"),  # not a SYN, even with an MSS option
        v4("PA", payload=b"x" * 10),
        v4("S", []),  # SYN without MSS: the implied 536 is below any clamp
        v4("S", [("MSS", 1200)]),  # already small enough
        v4("S", [("MSS", V4_MAX)]),
        v4("S", [("EOL", None), ("MSS", 1460)]),  # after End of Option List
        v6("A"),
        v6("S", [("MSS", 1200)]),
        v6("S", ext=(IPv6ExtHdrFragment(m=1),)),  # first fragment
        bytearray(raw(IP(flags="MF") / TCP(flags="S", options=[("MSS", 1460)]))),
        bytearray(raw(IP(proto=17) / (b"\0" * 24))),  # UDP
    ],
    ids=lambda w: IP(bytes(w)).summary() if w[0] >> 4 == 4 else IPv6(bytes(w)).summary(),
)
def test_untouched(wire: bytearray) -> None:
    before = bytes(wire)
    assert clamp_mss(wire, V4_MAX, V6_MAX) is False
    assert wire == before


def garbled(options: bytes) -> bytearray:
    """An IPv4 SYN whose option bytes are exactly ``options`` (padded to 4)."""
    options += b"\0" * (-len(options) % 4)
    tcp = TCP(flags="S", dataofs=5 + len(options) // 4) / b""
    wire = bytearray(raw(IP(src="10.0.0.1", dst="10.0.0.2") / tcp))
    wire[40:40] = options
    wire[2:4] = (len(wire)).to_bytes(2, "big")
    return wire


@pytest.mark.parametrize(
    "options",
    [
        b"\x02\x00\x05\xb4",  # MSS with length 0
        b"\x08\x01" + b"\x02\x04\x05\xb4",  # length 1 before a real MSS
        b"\x02\x03\x05\xb4",  # MSS with length 3
        b"\x02\x06\x05\xb4\x00\x00",  # MSS with length 6
        b"\x03\x09\x07\x02\x04\x05\xb4\x01",  # option running past the header
        b"\x01\x01\x01\x02",  # MSS kind as the last byte: length missing
    ],
)
def test_garbled_options_are_left_alone(options: bytes) -> None:
    wire = garbled(options)
    wire[10:12] = b"\0\0"  # whatever the checksums are, nothing may change
    before = bytes(wire)
    assert clamp_mss(wire, V4_MAX, V6_MAX) is False
    assert wire == before


def test_hand_built_mss_is_found_by_the_same_walk() -> None:
    wire = garbled(b"\x01\x02\x04\x05\xb4")  # NOP, MSS 1460 at odd offset, EOL pad
    pkt = IP(bytes(wire))
    del pkt[TCP].chksum
    wire = bytearray(raw(pkt))
    assert clamp_mss(wire, 1000, 1000)
    assert mss_of(IP(bytes(wire))) == 1000 and checksum_ok(wire)


@pytest.mark.parametrize(
    "wire",
    [
        bytearray(raw(IP() / TCP(flags="S"))[:30]),  # IP total length past the end
        bytearray(b"\x45\x00\x00\x1e" + raw(IP(proto=6))[4:] + b"\x00" * 10),  # 10-byte TCP
        bytearray(raw(IPv6() / TCP(flags="S"))[:50]),
        bytearray(b"\x45" + b"\x00" * 10),
        bytearray(b""),
        bytearray(b"\x70" * 40),
    ],
)
def test_truncated_headers_are_malformed(wire: bytearray) -> None:
    with pytest.raises(Drop) as e:
        clamp_mss(wire, V4_MAX, V6_MAX)
    assert e.value.reason is DropReason.MALFORMED


def test_data_offset_past_segment_is_malformed() -> None:
    wire = v4()
    wire[32] = 0xF0  # data offset 60 bytes, segment has 24
    with pytest.raises(Drop) as e:
        clamp_mss(wire, V4_MAX, V6_MAX)
    assert e.value.reason is DropReason.MALFORMED


option = st.sampled_from(
    [
        ("NOP", None),
        ("WScale", 7),
        ("SAckOK", b""),
        ("Timestamp", (5, 6)),
        ("SAck", (1, 2)),
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(option, max_size=3),
    after=st.lists(option, max_size=2),
    mss=st.integers(0, 0xFFFF),
    limit=st.integers(500, 9000),
    ipv6=st.booleans(),
    flags=st.sampled_from(["S", "SA", "A", "R", "SE"]),
    payload=st.binary(max_size=7),
)
def test_clamp_property(
    before: list,  # type: ignore[type-arg]
    after: list,  # type: ignore[type-arg]
    mss: int,
    limit: int,
    ipv6: bool,
    flags: str,
    payload: bytes,
) -> None:
    opts = [*before, ("MSS", mss), *after]
    assume(len(raw(TCP(options=opts))) <= 60)  # 40 bytes of options at most
    tcp = TCP(sport=5, dport=6, flags=flags, options=opts) / payload
    ip_layer = IPv6(src="::1", dst="::2") if ipv6 else IP(src="10.0.0.1", dst="10.0.0.2")
    wire = bytearray(raw(ip_layer / tcp))
    original = bytes(wire)
    changed = clamp_mss(wire, limit, limit)
    pkt = (IPv6 if ipv6 else IP)(bytes(wire))
    syn = "S" in flags
    assert changed == (syn and mss > limit)
    assert mss_of(pkt) == (min(mss, limit) if syn else mss)
    assert checksum_ok(wire)
    if not changed:
        assert bytes(wire) == original


@settings(max_examples=500, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 255)), min_size=1, max_size=5),
    cut=st.integers(0, 90),
    ipv6=st.booleans(),
)
def test_mutations_only_raise_drop(flips: list[tuple[int, int]], cut: int, ipv6: bool) -> None:
    opts = [("NOP", None), ("MSS", 1460), ("WScale", 2), ("SAckOK", b""), ("Timestamp", (1, 1))]
    wire = v6("S", opts) if ipv6 else v4("S", opts)
    for pos, x in flips:
        if pos < len(wire):
            wire[pos] ^= x
    del wire[cut:]
    with contextlib.suppress(Drop):
        clamp_mss(wire, V4_MAX, V6_MAX)
    with contextlib.suppress(Drop):
        clamp_mss(memoryview(wire), V4_MAX, V6_MAX)


@pytest.mark.parametrize("mtu", [1280, 1400, 1436, 1476])
def test_mss_for_mtu_fills_the_mtu_exactly(mtu: int) -> None:
    mss4, mss6 = mss_for_mtu(mtu)
    assert len(raw(IP() / TCP() / (b"s" * mss4))) == mtu
    assert len(raw(IPv6() / TCP() / (b"s" * mss6))) == mtu
