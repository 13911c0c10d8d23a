"""UDP encapsulation of ESP, RFC 3948: what arrived on UDP port 4500.

https://www.rfc-editor.org/rfc/rfc3948#section-2

Three things share port 4500 (RFC 3948 §2.1–2.3)::

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 SPI (non-zero)  -> ESP header follows          |   ESP
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 0x00000000 (non-ESP marker) -> IKE header      |   IKE
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |      0xFF     |   a one-octet NAT-keepalive                          keepalive

The UDP header itself (checksum 0 for ESP, RFC 3948 §2.1) is written by
``dataplane.ip.write_udp_header``; this module only looks at the UDP payload.
Sans-IO: bytes in, a verdict out.
"""

from __future__ import annotations

from enum import IntEnum

from dataplane.drops import Drop, DropReason

NON_ESP_MARKER = b"\x00\x00\x00\x00"
"""RFC 3948 §2.2: four zero octets where an SPI would be; IKE follows."""
KEEPALIVE_PAYLOAD = b"\xff"
"""RFC 3948 §2.3: the single-octet NAT-keepalive."""

_ESP_MIN = 8
"""SPI and sequence number; anything shorter cannot be ESP."""
_IKE_HEADER = 28
"""RFC 7296 §3.1: a fixed IKE header is 28 octets."""


class Udp4500(IntEnum):
    """What a UDP/4500 payload is."""

    ESP = 1
    """An ESP packet starting at the payload's first octet (the SPI)."""
    IKE = 2
    """An IKE message after the 4-octet non-ESP marker."""
    KEEPALIVE = 3
    """A NAT keepalive (RFC 3948 §2.3): recognised, then dropped by the caller."""


def classify(payload: bytes | bytearray | memoryview) -> Udp4500:
    """Tell ESP, IKE and NAT keepalives apart (RFC 3948 §2.2–2.3).

    Raises ``Drop(MALFORMED)`` for a payload that is none of them: empty, a
    one-octet payload other than 0xFF, an ESP candidate shorter than its
    8-octet header, or a non-ESP marker without a full IKE header behind it.
    """
    n = len(payload)
    if n < 4:
        if n == 1 and payload[0] == 0xFF:
            return Udp4500.KEEPALIVE
        raise Drop(DropReason.MALFORMED, "udp4500 payload too short")
    if payload[0] == 0 and payload[1] == 0 and payload[2] == 0 and payload[3] == 0:
        if n < 4 + _IKE_HEADER:
            raise Drop(DropReason.MALFORMED, "non-ESP marker without an IKE header")
        return Udp4500.IKE
    if n < _ESP_MIN:
        raise Drop(DropReason.MALFORMED, "ESP shorter than its header")
    return Udp4500.ESP


def ike_message(payload: bytes | bytearray | memoryview) -> memoryview:
    """The IKE message behind the non-ESP marker (no copy).

    ``Drop(MALFORMED)`` unless :func:`classify` says IKE.
    """
    if classify(payload) is not Udp4500.IKE:
        raise Drop(DropReason.MALFORMED, "not an IKE payload")
    return memoryview(payload)[4:]
