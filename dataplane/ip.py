"""IP-level helpers for the worker: outer headers, flows, ECN, path MTU.

Sans-IO and allocation-light (DESIGN §7): header writers ``pack_into`` a
caller's buffer at an offset and return the number of bytes written; parsers
``unpack_from`` at offsets and never slice. The slow paths (fragmentation and
ICMP errors, taken only when a packet does not fit) return fresh ``bytes``.

Everything that reads a packet raises :class:`~dataplane.drops.Drop` on bad
input and nothing else.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dataplane.drops import Drop, DropReason

Buffer = bytes | bytearray | memoryview
WBuffer = bytearray | memoryview

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_GRE = 47
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MH = 135
IPPROTO_HIP = 139
IPPROTO_SHIM6 = 140
IPPROTO_SCTP = 132

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
IPV6_MIN_MTU = 1280
"""RFC 8200 §5: every IPv6 link carries 1280 bytes; ICMPv6 errors fit in it."""

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_V6_ADDRS = struct.Struct("!QQQQ")
_V4_FLOW = struct.Struct("!BxHxxHxBxxII")  # ver/IHL, total, frag, proto, src, dst
_ICMP_HDR = struct.Struct("!BBHHH")  # type, code, checksum, unused, next-hop MTU
_ICMPV6_HDR = struct.Struct("!BBHI")  # type, code, checksum, MTU

_DF = 0x4000
_MF = 0x2000
_OFFSET_MASK = 0x1FFF

# Ports are only meaningful for these (RFC 6438 §3 / ECMP practice).
_PORT_PROTOS = frozenset((IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, 136))  # 136 = UDP-Lite
# RFC 8200 §4 and RFC 7045: headers that chain with (len + 1) * 8 bytes.
_IPV6_EXT_8 = frozenset(
    (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_MH, IPPROTO_HIP, IPPROTO_SHIM6)
)
_MAX_EXT_HEADERS = 8
"""Bound on the IPv6 extension-header walk (RFC 7112 limits the chain anyway)."""


# -- checksums -----------------------------------------------------------------


def ones_sum(data: Buffer) -> int:
    """16-bit one's complement sum (RFC 1071) of ``data``, not complemented.

    The whole buffer is read as one big-endian integer: since 2**16 ≡ 1
    (mod 0xFFFF), the integer modulo 0xFFFF is the sum of its 16-bit words
    with end-around carry. One C-level pass instead of a Python loop. An odd
    length is padded with a zero byte, as RFC 1071 §4.1 does.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    r = n % 0xFFFF
    # The one's complement sum is 0 only when every word is 0 (then also 0
    # here); any other multiple of 0xFFFF is the sum 0xFFFF ("negative zero").
    if r == 0 and n:
        return 0xFFFF
    return r


def internet_checksum(data: Buffer) -> int:
    """RFC 1071 Internet checksum; a packet including its checksum field sums to 0."""
    return ~ones_sum(data) & 0xFFFF


def _fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def checksum_replace16(checksum: int, old: int, new: int) -> int:
    """RFC 1624 eqn 3: ``HC' = ~(~HC + ~m + m')`` for one 16-bit word changed.

    ``old``/``new`` must be the word as it lies in the checksummed data's
    16-bit grid; a value straddling the grid at an odd offset contributes its
    byte-swapped value (the sum is byte-order independent, RFC 1071 §2(B)).
    """
    s = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    return ~_fold(s) & 0xFFFF


# -- header writers ------------------------------------------------------------


def write_ipv4_header(
    out: WBuffer,
    offset: int,
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    tos: int = 0,
    df: bool = True,
    ident: int = 0,
) -> int:
    """RFC 791 header without options at ``out[offset:]``; returns 20.

    The header checksum is computed from the field values, not re-read from
    the buffer. ``tos`` is the whole byte (DSCP << 2 | ECN, see :func:`ecn_encap`).
    A datagram over 65535 bytes cannot exist: ``Drop(MTU)``.
    """
    total = IPV4_HEADER_LEN + payload_len
    if total > 0xFFFF:
        raise Drop(DropReason.MTU, "IPv4 total length > 65535")
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    flags = _DF if df else 0
    s = (
        0x4500
        + tos
        + total
        + ident
        + flags
        + (ttl << 8 | proto)
        + int.from_bytes(src, "big")
        + int.from_bytes(dst, "big")
    )
    # Fold the 32-bit address values: (x >> 16) + (x & 0xFFFF) ≡ x mod 0xFFFF.
    csum = ~_fold(s) & 0xFFFF
    _IPV4.pack_into(out, offset, 0x45, tos, total, ident, flags, ttl, proto, csum, src, dst)
    return IPV4_HEADER_LEN


def write_ipv6_header(
    out: WBuffer,
    offset: int,
    *,
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    tclass: int = 0,
    flow_label: int = 0,
) -> int:
    """RFC 8200 §3 fixed header at ``out[offset:]``; returns 40.

    No jumbograms: a payload over 65535 bytes is ``Drop(MTU)``.
    """
    if payload_len > 0xFFFF:
        raise Drop(DropReason.MTU, "IPv6 payload length > 65535")
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses are 16 bytes")
    word = 0x60000000 | (tclass & 0xFF) << 20 | (flow_label & 0xFFFFF)
    _IPV6.pack_into(out, offset, word, payload_len, next_header, hop_limit, src, dst)
    return IPV6_HEADER_LEN


def write_udp_header(out: WBuffer, offset: int, *, sport: int, dport: int, payload_len: int) -> int:
    """UDP header with checksum 0; returns 8.

    RFC 3948 §2.1: the UDP checksum of ESP-in-UDP over IPv4 SHOULD be sent
    as zero (ESP protects the payload). Over IPv6 a zero checksum is not
    allowed (RFC 8200 §8.1): follow with :func:`set_udp_checksum`.
    """
    length = UDP_HEADER_LEN + payload_len
    if length > 0xFFFF:
        raise Drop(DropReason.MTU, "UDP length > 65535")
    _UDP.pack_into(out, offset, sport, dport, length, 0)
    return UDP_HEADER_LEN


def pseudo_header_sum(src: Buffer, dst: Buffer, proto: int, length: int) -> int:
    """Non-complemented sum of the RFC 768 / RFC 8200 §8.1 pseudo-header.

    The IPv6 form has a 32-bit length and the IPv4 form a 16-bit one; with
    lengths below 65536 both contribute ``length`` to the sum.
    """
    return ones_sum(src) + ones_sum(dst) + proto + length


def set_udp_checksum(out: WBuffer, offset: int, length: int, src: bytes, dst: bytes) -> int:
    """Fill the checksum of the UDP datagram ``out[offset:offset+length]``.

    ``src``/``dst`` are the 4- or 16-byte outer addresses. A computed 0 is
    sent as 0xFFFF (RFC 768). Returns the checksum.
    """
    _H.pack_into(out, offset + 6, 0)
    view = memoryview(out)[offset : offset + length]
    s = pseudo_header_sum(src, dst, IPPROTO_UDP, length) + ones_sum(view)
    csum = ~_fold(s) & 0xFFFF or 0xFFFF
    _H.pack_into(out, offset + 6, csum)
    return csum


_V4_OUTER = struct.Struct("!BBHxxxxxBxxII")  # ver/IHL, TOS, total, proto, src, dst


def parse_ipv4_header(packet: Buffer) -> tuple[int, int, int, int, int, int]:
    """(header length, total length, protocol, TOS, src, dst) of an IPv4 packet.

    For the outer header a raw socket hands over (Linux delivers it as on
    the wire, already checksum-verified and reassembled): the payload is
    ``packet[header_len:total_len]``, trailing bytes excluded. Addresses are
    ints. ``Drop(MALFORMED)`` if it is not IPv4 or the lengths disagree.
    """
    if len(packet) < IPV4_HEADER_LEN:
        raise Drop(DropReason.MALFORMED, "IPv4 header truncated")
    b0, tos, total, proto, src, dst = _V4_OUTER.unpack_from(packet, 0)
    ihl = (b0 & 0x0F) * 4
    if b0 >> 4 != 4 or ihl < IPV4_HEADER_LEN or total < ihl or total > len(packet):
        raise Drop(DropReason.MALFORMED, "IPv4 version or lengths")
    return ihl, total, proto, tos, src, dst


# -- flows -----------------------------------------------------------------------


class Flow(NamedTuple):
    """The 5-tuple the worker hashes for ECMP and checks against selectors."""

    version: int
    """4 or 6."""
    src: int
    """Source address as an integer (``int(ipaddress.ip_address(...))``)."""
    dst: int
    """Destination address as an integer."""
    proto: int
    """Upper-layer protocol after IPv6 extension headers (59 = none)."""
    sport: int
    """Source port, 0 if not TCP/UDP/SCTP/UDP-Lite or a fragment."""
    dport: int
    """Destination port, 0 like ``sport``."""


# NamedTuple's generated __new__ is Python code; tuple.__new__ is half the cost.
_new_flow = tuple.__new__


def ipv6_upper_layer(packet: Buffer, length: int) -> tuple[int, int, bool]:
    """Walk IPv6 extension headers: (protocol, its offset, is a fragment).

    ``length`` is the usable end (40 + payload length). Headers of RFC 8200
    §4 and RFC 7045 are skipped; ESP, ICMPv6, TCP, UDP and anything unknown
    end the walk. A fragment header with offset ≠ 0 or M set marks the
    packet as a fragment (ports unusable) and ends the walk, since what
    follows is not a header. A chain running past ``length`` is ``Drop(MALFORMED)``;
    one longer than 8 headers ends with ``IPPROTO_NONE``-like uncertainty:
    the current header is returned as protocol with no ports.
    """
    length = min(length, len(packet))
    if length < IPV6_HEADER_LEN:
        raise Drop(DropReason.MALFORMED, "IPv6 header truncated")
    nh = packet[6]
    off = IPV6_HEADER_LEN
    for _ in range(_MAX_EXT_HEADERS):
        if nh in _IPV6_EXT_8:
            if off + 2 > length:
                raise Drop(DropReason.MALFORMED, "IPv6 extension header truncated")
            nxt = packet[off]
            off += (packet[off + 1] + 1) * 8
            nh = nxt
        elif nh == IPPROTO_AH:
            if off + 2 > length:
                raise Drop(DropReason.MALFORMED, "AH truncated")
            nxt = packet[off]
            off += (packet[off + 1] + 2) * 4  # RFC 4302 §2.2: 32-bit words minus 2
            nh = nxt
        elif nh == IPPROTO_FRAGMENT:
            if off + 8 > length:
                raise Drop(DropReason.MALFORMED, "fragment header truncated")
            nxt = packet[off]
            frag = _H.unpack_from(packet, off + 2)[0]
            off += 8
            nh = nxt
            if frag & 0xFFF9:  # offset ≠ 0 or M: RFC 8200 §4.5
                return nh, off, True
        else:
            if off > length:
                raise Drop(DropReason.MALFORMED, "IPv6 extension chain past the end")
            return nh, off, False
    return nh, off, True


def parse_flow(packet: Buffer) -> Flow:
    """The inner packet's 5-tuple; ``Drop(MALFORMED)`` if it is not IPv4/IPv6.

    Fragments (IPv4 MF or offset ≠ 0, IPv6 fragment header with the same)
    get ports 0 so every fragment of a datagram hashes alike. A TCP/UDP
    packet too short to hold its ports is ``Drop(MALFORMED)``.
    """
    n = len(packet)
    if n < 1:
        raise Drop(DropReason.MALFORMED, "empty packet")
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_LEN:
            raise Drop(DropReason.MALFORMED, "IPv4 header truncated")
        b0, total, frag, proto, src, dst = _V4_FLOW.unpack_from(packet, 0)
        ihl = (b0 & 0x0F) * 4
        if ihl < IPV4_HEADER_LEN or total < ihl or total > n:
            raise Drop(DropReason.MALFORMED, "IPv4 lengths")
        if proto in _PORT_PROTOS and not frag & (_MF | _OFFSET_MASK):
            if ihl + 4 > total:
                raise Drop(DropReason.MALFORMED, "ports truncated")
            sport, dport = _HH.unpack_from(packet, ihl)
            return _new_flow(Flow, (4, src, dst, proto, sport, dport))
        return _new_flow(Flow, (4, src, dst, proto, 0, 0))
    if version == 6:
        if n < IPV6_HEADER_LEN:
            raise Drop(DropReason.MALFORMED, "IPv6 header truncated")
        end = IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0]
        if end > n:
            raise Drop(DropReason.MALFORMED, "IPv6 payload length")
        s_hi, s_lo, d_hi, d_lo = _V6_ADDRS.unpack_from(packet, 8)
        src = s_hi << 64 | s_lo
        dst = d_hi << 64 | d_lo
        proto = packet[6]
        if proto in _PORT_PROTOS:  # no extension headers: the common case
            off = IPV6_HEADER_LEN
            fragment = False
        else:
            proto, off, fragment = ipv6_upper_layer(packet, end)
        if proto in _PORT_PROTOS and not fragment:
            if off + 4 > end:
                raise Drop(DropReason.MALFORMED, "ports truncated")
            sport, dport = _HH.unpack_from(packet, off)
            return _new_flow(Flow, (6, src, dst, proto, sport, dport))
        return _new_flow(Flow, (6, src, dst, proto, 0, 0))
    raise Drop(DropReason.MALFORMED, "not IPv4 or IPv6")


# -- ECN, RFC 6040 -------------------------------------------------------------

NOT_ECT = 0b00
ECT1 = 0b01
ECT0 = 0b10
CE = 0b11

# RFC 6040 §4.2 Figure 4, indexed [inner ECN][outer ECN] -> new inner ECN,
# -1 = drop. Columns (outer): Not-ECT, ECT(1), ECT(0), CE (codepoint order).
_DECAP: tuple[tuple[int, int, int, int], ...] = (
    # inner Not-ECT: outer ECT(0)/ECT(1) "(!!!)" -> Not-ECT; outer CE -> drop
    (NOT_ECT, NOT_ECT, NOT_ECT, -1),
    # inner ECT(1): outer Not-ECT -> ECT(1), ECT(1), ECT(0) -> ECT(1) "(!)", CE
    (ECT1, ECT1, ECT1, CE),
    # inner ECT(0): outer ECT(1) -> ECT(1), ECT(0) -> ECT(0), CE -> CE
    (ECT0, ECT1, ECT0, CE),
    # inner CE: always CE
    (CE, CE, CE, CE),
)


def ecn_encap(inner_tos: int, *, copy_dscp: bool = False) -> int:
    """Outer TOS / traffic class byte for an inner one (RFC 6040 §4.1 normal mode).

    The ECN field is copied (normal mode; compatibility mode is for legacy
    decapsulators that we are not). The outer DSCP is 0 unless ``copy_dscp``
    (RFC 2983 uniform model).
    """
    if copy_dscp:
        return inner_tos & 0xFF
    return inner_tos & 0x03


def ecn_decap(outer_tos: int, inner_tos: int) -> int | None:
    """New inner TOS byte after decapsulation (RFC 6040 §4.2), or None to drop.

    The inner DSCP is kept; only the ECN field changes. None is the one
    combination RFC 6040 says MUST be dropped: outer CE over a Not-ECT inner
    packet (the congestion mark cannot be propagated).
    """
    ecn = _DECAP[inner_tos & 3][outer_tos & 3]
    if ecn < 0:
        return None
    return (inner_tos & 0xFC) | ecn


def apply_ecn_decap(packet: WBuffer, outer_tos: int) -> None:
    """Rewrite the inner packet's ECN in place per :func:`ecn_decap`.

    IPv4 header checksum updated incrementally (RFC 1624); IPv6 has none.
    ``Drop(ECN)`` for the RFC 6040 drop case, ``Drop(MALFORMED)`` if the
    packet is too short to hold its TOS byte.
    """
    if outer_tos & 3 == NOT_ECT:  # nothing to propagate: the common case
        return
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version == 4 and n >= IPV4_HEADER_LEN:
        old = packet[1]
        new = ecn_decap(outer_tos, old)
        if new is None:
            raise Drop(DropReason.ECN, "CE over Not-ECT (RFC 6040 §4.2)")
        if new != old:
            packet[1] = new
            csum = _H.unpack_from(packet, 10)[0]
            # byte 1 is the low byte of the first 16-bit word (0x45, tos)
            oldw = (packet[0] << 8) | old
            neww = (packet[0] << 8) | new
            _H.pack_into(packet, 10, checksum_replace16(csum, oldw, neww))
        return
    if version == 6 and n >= IPV6_HEADER_LEN:
        first = _H.unpack_from(packet, 0)[0]
        old = (first >> 4) & 0xFF
        new = ecn_decap(outer_tos, old)
        if new is None:
            raise Drop(DropReason.ECN, "CE over Not-ECT (RFC 6040 §4.2)")
        if new != old:
            _H.pack_into(packet, 0, (first & 0xF00F) | (new << 4))
        return
    raise Drop(DropReason.MALFORMED, "inner packet too short for ECN")


# -- path MTU: fragmentation and ICMP errors -----------------------------------


def _check_ipv4(packet: Buffer) -> tuple[int, int]:
    """(header length, total length) of a sane IPv4 packet, else Drop."""
    n = len(packet)
    if n < IPV4_HEADER_LEN or packet[0] >> 4 != 4:
        raise Drop(DropReason.MALFORMED, "not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    total = _H.unpack_from(packet, 2)[0]
    if ihl < IPV4_HEADER_LEN or total < ihl or total > n:
        raise Drop(DropReason.MALFORMED, "IPv4 lengths")
    return ihl, total


def _copied_options(options: Buffer) -> bytes:
    """Options with the copied flag (RFC 791 §3.1: type bit 0x80), EOL padded.

    Non-first fragments carry only these (RFC 791 §3.2 "fragmentation").
    Garbled option lists are ``Drop(MALFORMED)``.
    """
    out = bytearray()
    i = 0
    n = len(options)
    while i < n:
        kind = options[i]
        if kind == 0:  # End of Option List
            break
        if kind == 1:  # No Operation: not copied
            i += 1
            continue
        if i + 1 >= n:
            raise Drop(DropReason.MALFORMED, "IPv4 option truncated")
        olen = options[i + 1]
        if olen < 2 or i + olen > n:
            raise Drop(DropReason.MALFORMED, "IPv4 option length")
        if kind & 0x80:
            out += options[i : i + olen]
        i += olen
    out += bytes(-len(out) % 4)
    return bytes(out)


def fragment_ipv4(packet: Buffer, mtu: int) -> list[bytes]:
    """Split an IPv4 packet into fragments of at most ``mtu`` bytes (RFC 791).

    Inner fragmentation before encapsulation, as the seeds recommend for
    packets without DF. A packet that fits comes back whole (as one bytes).
    DF set and too big: ``Drop(MTU)`` (send :func:`icmp_frag_needed`
    instead). Fragmenting a fragment keeps its offset base and its MF on
    the last piece. Each piece's data is a multiple of 8 bytes except the
    last; the first keeps all options, the rest only the copied ones.
    Bytes past the total length are dropped.
    """
    if mtu < 68:  # RFC 791: every module handles 68 octets without fragmentation
        raise ValueError("IPv4 MTU below 68")
    ihl, total = _check_ipv4(packet)
    if total <= mtu:
        return [bytes(packet[:total])]
    frag = _H.unpack_from(packet, 6)[0]
    if frag & _DF:
        raise Drop(DropReason.MTU, "DF set")
    base = frag & _OFFSET_MASK
    last_mf = frag & _MF
    first_hdr = bytearray(packet[:ihl])
    later_opts = _copied_options(packet[IPV4_HEADER_LEN:ihl])
    later_hdr = bytearray(packet[:IPV4_HEADER_LEN]) + later_opts
    later_hdr[0] = 0x40 | (len(later_hdr) // 4)

    fragments: list[bytes] = []
    pos = ihl  # next data byte to send
    hdr = first_hdr
    while pos < total:
        hlen = len(hdr)
        room = (mtu - hlen) & ~7
        if room <= 0:  # cannot happen for mtu >= 68 and hlen <= 60
            raise Drop(DropReason.MTU, "MTU too small for the header")
        chunk = min(room, total - pos)
        more = pos + chunk < total
        unit = base + (pos - ihl) // 8
        if unit > _OFFSET_MASK:
            raise Drop(DropReason.MALFORMED, "fragment offset overflow")
        flags = (_MF if more else last_mf) | unit
        piece = bytearray(hdr)
        piece += packet[pos : pos + chunk]
        _H.pack_into(piece, 2, hlen + chunk)
        _H.pack_into(piece, 6, flags)
        _H.pack_into(piece, 10, 0)
        _H.pack_into(piece, 10, internet_checksum(memoryview(piece)[:hlen]))
        fragments.append(bytes(piece))
        pos += chunk
        hdr = later_hdr
    return fragments


def _icmp_source_ok_v4(addr: int) -> bool:
    """RFC 1122 §3.2.2 / RFC 1812 §4.3.2.7: no ICMP errors to these sources."""
    first = addr >> 24
    return not (
        addr == 0
        or addr == 0xFFFFFFFF
        or first == 127  # loopback
        or first >= 224  # multicast (224/4) and class E (240/4)
    )


def icmp_frag_needed(packet: Buffer, mtu: int, src: bytes, *, ttl: int = 64) -> bytes:
    """An ICMP "fragmentation needed and DF set" (type 3 code 4) IPv4 packet.

    RFC 792 / RFC 1191 §4: the next-hop MTU sits in the low 16 bits of the
    second word, and the message quotes the offending IP header plus the
    first 8 bytes of its data. Addressed to that packet's source, from
    ``src`` (4 bytes: the gateway's inner address).

    RFC 1122 §3.2.2 forbids an error about an ICMP error, a non-first
    fragment, or to a broadcast/multicast/loopback/zero source; then no
    packet can be made and ``Drop(MTU)`` is raised (the packet is dropped
    for MTU either way).
    """
    ihl, total = _check_ipv4(packet)
    frag = _H.unpack_from(packet, 6)[0]
    if frag & _OFFSET_MASK:
        raise Drop(DropReason.MTU, "no ICMP error for a non-first fragment")
    if packet[9] == IPPROTO_ICMP:
        if ihl + 1 > total:
            raise Drop(DropReason.MALFORMED, "ICMP type truncated")
        if packet[ihl] not in (0, 8, 13, 14, 15, 16, 17, 18):  # not a query/reply
            raise Drop(DropReason.MTU, "no ICMP error about an ICMP error")
    if not _icmp_source_ok_v4(int.from_bytes(packet[12:16], "big")):
        raise Drop(DropReason.MTU, "no ICMP error to this source")
    quote = packet[: min(total, ihl + 8)]
    icmp_len = 8 + len(quote)
    out = bytearray(IPV4_HEADER_LEN + icmp_len)
    write_ipv4_header(
        out,
        0,
        src=src,
        dst=bytes(packet[12:16]),
        proto=IPPROTO_ICMP,
        payload_len=icmp_len,
        ttl=ttl,
        tos=0xC0,  # CS6, network control, like Linux's ICMP errors
        df=False,
    )
    _ICMP_HDR.pack_into(out, IPV4_HEADER_LEN, 3, 4, 0, 0, min(mtu, 0xFFFF))
    out[IPV4_HEADER_LEN + 8 :] = quote
    csum = internet_checksum(memoryview(out)[IPV4_HEADER_LEN:])
    _H.pack_into(out, IPV4_HEADER_LEN + 2, csum)
    return bytes(out)


def _icmpv6_error_allowed(packet: Buffer, end: int) -> bool:
    """RFC 4443 §2.4 (e): no error about an ICMPv6 error; (e.3) exempts
    Packet Too Big from the multicast-destination rule, so only the source
    is checked: never to unspecified or multicast (RFC 4443 §2.4 (e.6))."""
    if packet[8] == 0xFF:  # multicast source
        return False
    if not any(packet[8:24]):  # unspecified ::
        return False
    try:
        proto, off, fragment = ipv6_upper_layer(packet, end)
    except Drop:
        return True  # we can still quote a packet whose chain we cannot parse
    if proto == IPPROTO_ICMPV6 and not fragment:
        if off >= end:
            return True
        return packet[off] >= 128  # informational messages are 128..255
    return True


def icmpv6_packet_too_big(packet: Buffer, mtu: int, src: bytes, *, hop_limit: int = 64) -> bytes:
    """An ICMPv6 Packet Too Big (RFC 4443 §3.2) for an IPv6 packet.

    Carries the MTU (32 bits) and as much of the invoking packet as fits in
    the IPv6 minimum MTU of 1280 bytes (RFC 4443 §2.4 (c)); the checksum
    covers the RFC 8200 §8.1 pseudo-header. Addressed to the packet's
    source, from ``src`` (16 bytes). ``Drop(MTU)`` when RFC 4443 §2.4 (e)
    forbids the error (about an ICMPv6 error, or to a multicast or
    unspecified source).
    """
    n = len(packet)
    if n < IPV6_HEADER_LEN or packet[0] >> 4 != 6:
        raise Drop(DropReason.MALFORMED, "not an IPv6 packet")
    end = min(n, IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0])
    if not _icmpv6_error_allowed(packet, end):
        raise Drop(DropReason.MTU, "no ICMPv6 error for this packet")
    quote = packet[: min(end, IPV6_MIN_MTU - IPV6_HEADER_LEN - 8)]
    icmp_len = 8 + len(quote)
    out = bytearray(IPV6_HEADER_LEN + icmp_len)
    dst = bytes(packet[8:24])
    write_ipv6_header(
        out,
        0,
        src=src,
        dst=dst,
        next_header=IPPROTO_ICMPV6,
        payload_len=icmp_len,
        hop_limit=hop_limit,
    )
    _ICMPV6_HDR.pack_into(out, IPV6_HEADER_LEN, 2, 0, 0, mtu & 0xFFFFFFFF)
    out[IPV6_HEADER_LEN + 8 :] = quote
    s = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, icmp_len)
    s += ones_sum(memoryview(out)[IPV6_HEADER_LEN:])
    _H.pack_into(out, IPV6_HEADER_LEN + 2, ~_fold(s) & 0xFFFF)
    return bytes(out)
