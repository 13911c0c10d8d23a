"""GRE, RFC 2784, with the key and sequence number fields of RFC 2890.

A GRE tunnel is stateless (DESIGN §3): any worker decapsulates any packet,
so the sequence number is accepted and ignored (RFC 2890 §2.2 lets a
receiver that does not keep per-flow state do so) and the key is handed to
the caller, who matches it against the tunnel's ``gre_key``.

Wire format (RFC 2784 §2, RFC 2890 §2)::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |C|R|K|S|s|Recur|  Reserved0  | Ver |         Protocol Type         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      Checksum (optional)      |       Reserved1 (Optional)        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Key (optional)                            |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 Sequence Number (Optional)                        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

R (routing), s (strict source route) and Recur are the RFC 1701 bits that
RFC 2784 §2.3 folded into Reserved0: "A receiver MUST discard a packet where
any of bits 1-5 are non-zero, unless that receiver implements RFC 1701.
Bits 6-12 [...] MUST be ignored on receipt." So bit 1 (routing, a real
RFC 1701 feature we do not implement) is ``UNSUPPORTED``, bits 4-5 and a
version ≠ 0 are ``BAD_VERSION``, and bits 6-12 are ignored as the MUST says.
"""

from __future__ import annotations

import struct

from dataplane.drops import Drop, DropReason
from dataplane.ip import Buffer, WBuffer, internet_checksum

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD

FLAG_C = 0x8000
"""Checksum present (RFC 2784 §2.5)."""
FLAG_R = 0x4000
"""Routing present (RFC 1701): unsupported."""
FLAG_K = 0x2000
"""Key present (RFC 2890 §2.1)."""
FLAG_S = 0x1000
"""Sequence number present (RFC 2890 §2.2)."""
_MUST_BE_ZERO = 0x0C00  # bits 4-5: strict source route and Recur's top bit
_VERSION = 0x0007

_BASE = struct.Struct("!HH")
_BASE_KEY = struct.Struct("!HHI")
_I = struct.Struct("!I")
_H = struct.Struct("!H")
_PROTOCOLS = frozenset((ETH_P_IP, ETH_P_IPV6))


def header_len(*, key: int | None = None, seq: int | None = None, checksum: bool = False) -> int:
    """Bytes of GRE header for these options: 4, plus 4 for each field."""
    return (
        4 + (4 if checksum else 0) + (4 if key is not None else 0) + (4 if seq is not None else 0)
    )


def write_header(
    out: WBuffer,
    offset: int,
    protocol: int,
    payload_len: int,
    *,
    key: int | None = None,
    seq: int | None = None,
    checksum: bool = False,
) -> int:
    """Write the GRE header in front of a payload already at its place.

    For the zero-copy path: the worker reads the inner packet into its
    buffer at ``offset + header_len(...)`` and calls this. With
    ``checksum`` the payload must be in place, since the checksum covers
    header and payload (RFC 2784 §2.5). Returns the header length.
    """
    if seq is None and not checksum:  # the common shapes, one pack each
        if key is None:
            _BASE.pack_into(out, offset, 0, protocol)
            return 4
        _BASE_KEY.pack_into(out, offset, FLAG_K, protocol, key)
        return 8
    flags = 0
    off = offset + 4
    if checksum:
        flags |= FLAG_C
        _I.pack_into(out, off, 0)  # checksum 0 while summing, Reserved1 = 0
        off += 4
    if key is not None:
        flags |= FLAG_K
        _I.pack_into(out, off, key)
        off += 4
    if seq is not None:
        flags |= FLAG_S
        _I.pack_into(out, off, seq & 0xFFFFFFFF)
        off += 4
    _BASE.pack_into(out, offset, flags, protocol)
    hlen = off - offset
    if checksum:
        view = memoryview(out)[offset : off + payload_len]
        _H.pack_into(out, offset + 4, internet_checksum(view))
    return hlen


def encapsulate_into(
    out: WBuffer,
    offset: int,
    inner: Buffer,
    protocol: int,
    *,
    key: int | None = None,
    seq: int | None = None,
    checksum: bool = False,
) -> int:
    """Write GRE header + ``inner`` at ``out[offset:]``; returns their length.

    ``protocol`` is the EtherType of ``inner`` (:data:`ETH_P_IP` or
    :data:`ETH_P_IPV6`). ``seq`` wraps modulo 2**32 (RFC 2890 §2.2). ``out``
    must have room (a bytearray slice assignment past its end would grow it,
    so the length is checked). ``inner`` must not overlap the destination
    unless it already sits exactly there: then :func:`write_header` is the
    call that skips the copy.
    """
    n = len(inner)
    if seq is None and not checksum:  # the common shapes, one pack each
        if key is None:
            end = offset + 4 + n
            if end > len(out):
                raise ValueError("output buffer too small")
            out[offset + 4 : end] = inner
            _BASE.pack_into(out, offset, 0, protocol)
            return 4 + n
        end = offset + 8 + n
        if end > len(out):
            raise ValueError("output buffer too small")
        out[offset + 8 : end] = inner
        _BASE_KEY.pack_into(out, offset, FLAG_K, protocol, key)
        return 8 + n
    hlen = header_len(key=key, seq=seq, checksum=checksum)
    start = offset + hlen
    end = start + n
    if end > len(out):
        raise ValueError("output buffer too small")
    out[start:end] = inner
    write_header(out, offset, protocol, n, key=key, seq=seq, checksum=checksum)
    return end - offset


def decapsulate(packet: Buffer) -> tuple[int, int | None, int]:
    """Parse a GRE packet: (protocol type, key or None, payload offset).

    ``packet`` is exactly the GRE header and payload (the outer IP total
    length already applied), because the optional checksum covers all of
    it. Raises ``Drop``: MALFORMED (short), BAD_VERSION (version ≠ 0, or
    bits 4-5 set), UNSUPPORTED (routing present, or a protocol that is
    neither IPv4 nor IPv6), BAD_CHECKSUM (checksum present and wrong).
    """
    n = len(packet)
    if n < 4:
        raise Drop(DropReason.MALFORMED, "GRE header truncated")
    flags, protocol = _BASE.unpack_from(packet, 0)
    if protocol in _PROTOCOLS:  # the common shapes first
        if not flags:
            return protocol, None, 4
        if flags == FLAG_K and n >= 8:
            return protocol, _I.unpack_from(packet, 4)[0], 8
    if flags & (_VERSION | _MUST_BE_ZERO):
        raise Drop(DropReason.BAD_VERSION, "GRE version or reserved bits 4-5")
    if flags & FLAG_R:
        raise Drop(DropReason.UNSUPPORTED, "GRE routing (RFC 1701)")
    off = 4
    if flags & FLAG_C:
        off += 4
        if n < off:
            raise Drop(DropReason.MALFORMED, "GRE checksum truncated")
    key: int | None = None
    if flags & FLAG_K:
        if n < off + 4:
            raise Drop(DropReason.MALFORMED, "GRE key truncated")
        key = _I.unpack_from(packet, off)[0]
        off += 4
    if flags & FLAG_S:
        off += 4
        if n < off:
            raise Drop(DropReason.MALFORMED, "GRE sequence truncated")
    if protocol not in _PROTOCOLS:
        raise Drop(DropReason.UNSUPPORTED, "GRE protocol type")
    if flags & FLAG_C and internet_checksum(packet) != 0:
        raise Drop(DropReason.BAD_CHECKSUM, "GRE checksum")
    return protocol, key, off
