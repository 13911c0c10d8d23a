"""GRE (RFC 2784 / RFC 2890) against scapy's independent GRE layer, both ways."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE

from dataplane import gre
from dataplane.drops import Drop, DropReason

INNER_V4 = raw(IP(src="10.0.0.1", dst="10.1.0.2") / UDP(sport=1234, dport=53) / (b"q" * 33))
INNER_V6 = raw(IPv6(src="2001:db8::1", dst="2001:db8:1::2") / ICMP() / (b"x" * 21))

OPTIONS = [
    {},
    {"key": 0x01020304},
    {"seq": 7},
    {"checksum": True},
    {"key": 0xFFFFFFFF, "seq": 0, "checksum": True},
    {"key": 0, "checksum": True},
]


def ours(inner: bytes, proto: int, **opts: object) -> bytes:
    out = bytearray(200)
    n = gre.encapsulate_into(out, 3, inner, proto, **opts)  # type: ignore[arg-type]
    assert n == gre.header_len(**opts) + len(inner)  # type: ignore[arg-type]
    return bytes(out[3 : 3 + n])


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize(("inner", "proto"), [(INNER_V4, 0x0800), (INNER_V6, 0x86DD)])
def test_scapy_parses_our_encapsulation(inner: bytes, proto: int, opts: dict[str, object]) -> None:
    wire = ours(inner, proto, **opts)
    pkt = GRE(wire)
    assert pkt.version == 0 and pkt.routing_present == 0
    assert pkt.proto == proto
    assert bool(pkt.key_present) == ("key" in opts)
    assert bool(pkt.seqnum_present) == ("seq" in opts)
    assert bool(pkt.chksum_present) == bool(opts.get("checksum"))
    if "key" in opts:
        assert pkt.key == opts["key"]
    if "seq" in opts:
        assert pkt.sequence_number == opts["seq"]
    if opts.get("checksum"):
        again = pkt.copy()
        again.chksum = None  # let scapy compute it from scratch
        assert GRE(raw(again)).chksum == pkt.chksum
    assert raw(pkt.payload) == inner
    # scapy picked the inner layer from the protocol type
    assert pkt.payload.__class__ is (IP if proto == 0x0800 else IPv6)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize(("inner", "proto"), [(INNER_V4, 0x0800), (INNER_V6, 0x86DD)])
def test_we_decapsulate_scapy(inner: bytes, proto: int, opts: dict[str, object]) -> None:
    fields: dict[str, object] = {"proto": proto}
    if "key" in opts:
        fields.update(key_present=1, key=opts["key"])
    if "seq" in opts:
        fields.update(seqnum_present=1, sequence_number=opts["seq"])
    if opts.get("checksum"):
        fields.update(chksum_present=1)
    wire = raw(GRE(**fields) / inner)
    protocol, key, off = gre.decapsulate(wire)
    assert protocol == proto
    assert key == opts.get("key")
    assert wire[off:] == inner
    # and byte-identical to what we would have sent
    assert wire == ours(inner, proto, **opts)


def test_bad_checksum_is_refused() -> None:
    good = raw(GRE(chksum_present=1, proto=0x0800) / INNER_V4)
    protocol, _, _ = gre.decapsulate(good)
    assert protocol == 0x0800
    wrong = raw(GRE(chksum_present=1, chksum=GRE(good).chksum ^ 0x0100, proto=0x0800) / INNER_V4)
    with pytest.raises(Drop) as e:
        gre.decapsulate(wrong)
    assert e.value.reason is DropReason.BAD_CHECKSUM
    corrupted = bytearray(good)
    corrupted[-1] ^= 0x40  # payload damage is caught too
    with pytest.raises(Drop) as e:
        gre.decapsulate(corrupted)
    assert e.value.reason is DropReason.BAD_CHECKSUM


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"version": 1}, DropReason.BAD_VERSION),  # PPTP enhanced GRE
        ({"version": 7}, DropReason.BAD_VERSION),
        ({"strict_route_source": 1}, DropReason.BAD_VERSION),  # bit 4
        ({"recursion_control": 4}, DropReason.BAD_VERSION),  # bit 5
        ({"routing_present": 1}, DropReason.UNSUPPORTED),
        ({"proto": 0x6558}, DropReason.UNSUPPORTED),  # transparent Ethernet bridging
        ({"proto": 0x0806}, DropReason.UNSUPPORTED),
    ],
)
def test_refused_headers(fields: dict[str, int], reason: DropReason) -> None:
    fields = {"proto": 0x0800, **fields}
    with pytest.raises(Drop) as e:
        gre.decapsulate(raw(GRE(**fields) / INNER_V4))
    assert e.value.reason is reason


@pytest.mark.parametrize("fields", [{"recursion_control": 3}, {"flags": 0x1F}])
def test_bits_6_to_12_are_ignored(fields: dict[str, int]) -> None:
    """RFC 2784 §2.3: bits 6-12 "MUST be ignored on receipt"."""
    wire = raw(GRE(proto=0x86DD, key_present=1, key=9, **fields) / INNER_V6)
    assert gre.decapsulate(wire) == (0x86DD, 9, 8)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_truncated_headers_are_malformed(opts: dict[str, object]) -> None:
    wire = ours(b"", 0x0800, **opts)
    for cut in range(len(wire)):
        with pytest.raises(Drop) as e:
            gre.decapsulate(wire[:cut])
        assert e.value.reason is DropReason.MALFORMED, cut
    # the header alone is fine: an empty payload is the caller's business
    assert gre.decapsulate(wire)[2] == len(wire)


def test_sequence_wraps_and_header_only_write_matches() -> None:
    assert GRE(ours(INNER_V4, 0x0800, seq=2**32 + 5)).sequence_number == 5
    # zero-copy path: payload already in place, header written in front
    buf = bytearray(100)
    h = gre.header_len(key=1, seq=2, checksum=True)
    buf[10 + h : 10 + h + len(INNER_V4)] = INNER_V4
    assert gre.write_header(buf, 10, 0x0800, len(INNER_V4), key=1, seq=2, checksum=True) == h
    assert bytes(buf[10 : 10 + h + len(INNER_V4)]) == ours(
        INNER_V4, 0x0800, key=1, seq=2, checksum=True
    )


def test_buffer_too_small_is_a_programming_error_not_growth() -> None:
    out = bytearray(10)
    with pytest.raises(ValueError):
        gre.encapsulate_into(out, 0, INNER_V4, 0x0800)
    assert len(out) == 10


@settings(max_examples=300, deadline=None)
@given(
    inner=st.binary(max_size=300),
    proto=st.sampled_from([0x0800, 0x86DD]),
    key=st.none() | st.integers(0, 2**32 - 1),
    seq=st.none() | st.integers(0, 2**32 - 1),
    checksum=st.booleans(),
)
def test_round_trip(inner: bytes, proto: int, key: int | None, seq: int | None, checksum: bool):
    out = bytearray(400)
    n = gre.encapsulate_into(out, 0, inner, proto, key=key, seq=seq, checksum=checksum)
    protocol, got_key, off = gre.decapsulate(memoryview(out)[:n])
    assert (protocol, got_key, bytes(out[off:n])) == (proto, key, inner)
    pkt = GRE(bytes(out[:n]))
    assert pkt.key == key and pkt.sequence_number == seq


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_only_raise_drop(data: bytes) -> None:
    try:
        protocol, _, off = gre.decapsulate(data)
    except Drop:
        return
    assert protocol in (0x0800, 0x86DD) and 4 <= off <= len(data)


@settings(max_examples=500, deadline=None)
@given(
    key=st.none() | st.integers(0, 2**32 - 1),
    checksum=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 80), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 100),
)
def test_mutated_packets_only_raise_drop(
    key: int | None, checksum: bool, flips: list[tuple[int, int]], cut: int
) -> None:
    wire = bytearray(ours(INNER_V4, 0x0800, key=key, seq=3, checksum=checksum))
    for pos, x in flips:
        if pos < len(wire):
            wire[pos] ^= x
    del wire[cut:]
    try:
        gre.decapsulate(wire)
    except Drop as e:
        assert isinstance(e.reason, DropReason)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_zero_copy_header_equals_encapsulation(opts: dict[str, object]) -> None:
    h = gre.header_len(**opts)  # type: ignore[arg-type]
    buf = bytearray(b"\xee" * 120)  # stale bytes where the header goes
    buf[5 + h : 5 + h + len(INNER_V6)] = INNER_V6
    assert gre.write_header(buf, 5, 0x86DD, len(INNER_V6), **opts) == h  # type: ignore[arg-type]
    assert bytes(buf[5 : 5 + h + len(INNER_V6)]) == ours(INNER_V6, 0x86DD, **opts)
    assert buf[:5] == b"\xee" * 5 and buf[5 + h + len(INNER_V6) :] == b"\xee" * (
        120 - 5 - h - len(INNER_V6)
    )
