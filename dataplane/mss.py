"""TCP MSS clamping of SYN and SYN-ACK segments, IPv4 and IPv6, in place.

Encapsulation eats into the 1500-byte path (the seeds: "the maximum segment
size (MSS) must be adjusted"), so the worker lowers the MSS option of every
TCP SYN crossing a tunnel, both ways (RFC 879, RFC 6691 §2: MSS = MTU minus
the fixed IP and TCP headers). Only lowered, never raised; a SYN without the
option is left alone (its implied 536 / 1220 is below any sane clamp).

The TCP checksum is patched with RFC 1624 eqn 3 rather than recomputed, so
clamping costs the same for a SYN with or without payload. The option walk
is defensive: a garbled list (length < 2, running past the header) means
"do not touch"; only a header too short to hold what it claims raises
``Drop(MALFORMED)``.
"""

from __future__ import annotations

import struct

from dataplane.drops import Drop, DropReason
from dataplane.ip import (
    IPPROTO_TCP,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    WBuffer,
    checksum_replace16,
    ipv6_upper_layer,
)

TCP_HEADER_LEN = 20
TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
_SYN = 0x02
_H = struct.Struct("!H")
_V4 = struct.Struct("!BxHxxHxB")  # version/IHL, total length, flags/offset, protocol


def mss_for_mtu(mtu: int) -> tuple[int, int]:
    """(IPv4, IPv6) MSS clamps for an inner MTU: RFC 6691 §2, MTU minus the
    fixed IP (20 / 40) and TCP (20) headers; options come out of the MSS."""
    return mtu - 40, mtu - 60


def _tcp6_offset(packet: WBuffer, n: int) -> tuple[int, int] | None:
    """(TCP header offset, IP end) of an unfragmented IPv6 TCP segment, else None."""
    if n < IPV6_HEADER_LEN:
        raise Drop(DropReason.MALFORMED, "IPv6 header truncated")
    end = IPV6_HEADER_LEN + _H.unpack_from(packet, 4)[0]
    if end > n:
        raise Drop(DropReason.MALFORMED, "IPv6 payload length")
    if packet[6] == IPPROTO_TCP:
        return IPV6_HEADER_LEN, end
    proto, off, fragment = ipv6_upper_layer(packet, end)
    if proto != IPPROTO_TCP or fragment:
        return None
    return off, end


def clamp_mss(packet: WBuffer, max_mss_v4: int, max_mss_v6: int) -> bool:
    """Lower the MSS option of a TCP SYN / SYN-ACK to the family's maximum.

    Returns True if the packet was changed. Anything that is not an
    unfragmented TCP segment with SYN set is returned untouched (False).
    A (SYN) segment whose IP or TCP header is truncated: ``Drop(MALFORMED)``.
    A first fragment is not clamped (IPv4 MF set): fragmented SYNs do not
    happen in practice and the TCP header may not be whole.
    """
    # Every TCP packet of every tunnel passes here: IPv4 is inlined, and a
    # non-TCP or non-SYN packet leaves after a handful of byte reads.
    n = len(packet)
    if n < 1:
        raise Drop(DropReason.MALFORMED, "empty packet")
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_LEN:
            raise Drop(DropReason.MALFORMED, "IPv4 header truncated")
        b0, end, frag, proto = _V4.unpack_from(packet, 0)
        tcp = (b0 & 0x0F) * 4
        if tcp < IPV4_HEADER_LEN or end < tcp or end > n:
            raise Drop(DropReason.MALFORMED, "IPv4 lengths")
        if proto != IPPROTO_TCP or frag & 0x3FFF:
            return False  # not TCP, or a fragment (MF or offset ≠ 0)
        limit = max_mss_v4
    elif version == 6:
        found = _tcp6_offset(packet, n)
        if found is None:
            return False
        tcp, end = found
        limit = max_mss_v6
    else:
        raise Drop(DropReason.MALFORMED, "not IPv4 or IPv6")
    if tcp + TCP_HEADER_LEN > end:
        raise Drop(DropReason.MALFORMED, "TCP header truncated")
    if not packet[tcp + 13] & _SYN:
        return False
    doff = (packet[tcp + 12] >> 4) * 4
    if doff < TCP_HEADER_LEN or tcp + doff > end:
        raise Drop(DropReason.MALFORMED, "TCP data offset")
    i = tcp + TCP_HEADER_LEN
    opt_end = tcp + doff
    while i < opt_end:
        kind = packet[i]
        if kind == TCPOPT_EOL:
            return False
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= opt_end:
            return False  # length byte missing: garbled, leave alone
        olen = packet[i + 1]
        if olen < 2 or i + olen > opt_end:
            return False
        if kind == TCPOPT_MSS:
            if olen != 4:
                return False
            old = _H.unpack_from(packet, i + 2)[0]
            if old <= limit:
                return False
            _H.pack_into(packet, i + 2, limit)
            csum = _H.unpack_from(packet, tcp + 16)[0]
            if (i + 2 - tcp) & 1:
                # RFC 1071 §2(B): at an odd offset the value straddles two
                # words of the sum and contributes byte-swapped.
                old = ((old & 0xFF) << 8) | (old >> 8)
                new = ((limit & 0xFF) << 8) | (limit >> 8)
            else:
                new = limit
            _H.pack_into(packet, tcp + 16, checksum_replace16(csum, old, new))
            return True
        i += olen
    return False
