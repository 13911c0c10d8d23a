"""IKEv2 messages: the header (RFC 7296 §3.1), the payload chain (§3.2) and the
Encrypted payload around the inner chain (§3.14).

::

                         1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                       IKE SA Initiator's SPI                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                       IKE SA Responder's SPI                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  Next Payload | MjVer | MnVer | Exchange Type |     Flags     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                          Message ID                           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                            Length                             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from control.ike.crypto import SkCipher
from control.ike.payloads import (
    KNOWN_TYPES,
    Body,
    Buffer,
    BufferReadError,
    NotifyPayload,
    Payload,
    PayloadType,
    RawPayload,
    pull_body,
    push_body,
)

HEADER = struct.Struct("!8s8sBBBBII")
HEADER_LEN = 28
GENERIC = struct.Struct("!BBH")
FLAG_INITIATOR = 0x08
FLAG_VERSION = 0x10
FLAG_RESPONSE = 0x20
IKE_VERSION = 0x20
MAX_PAYLOADS = 128
"""More payloads than this in one message is refused as INVALID_SYNTAX."""
MAX_MESSAGE = 65535


class MessageError(ValueError):
    """A message that does not parse (→ INVALID_SYNTAX or a silent drop)."""


@dataclass(slots=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    next_payload: int
    version: int
    exchange: int
    flags: int
    message_id: int
    length: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    @property
    def from_initiator(self) -> bool:
        """The I flag: sent by the original initiator of the IKE SA (§3.1)."""
        return bool(self.flags & FLAG_INITIATOR)


@dataclass(slots=True)
class Message:
    header: Header
    payloads: list[Payload] = field(default_factory=list)
    sk_offset: int | None = None
    """Offset of the SK payload's generic header, if the message has one."""
    sk_first: int = 0
    """Type of the first payload inside SK."""
    unknown_critical: int | None = None
    """First unrecognised payload type with the critical bit (§2.5)."""
    raw: bytes = b""

    def get(self, ptype: int) -> Body | None:
        for p in self.payloads:
            if p.type == ptype:
                return p.body
        return None

    def all(self, ptype: int) -> list[Body]:
        return [p.body for p in self.payloads if p.type == ptype]

    def notifies(self) -> list[NotifyPayload]:
        return [p.body for p in self.payloads if isinstance(p.body, NotifyPayload)]

    def notify(self, ntype: int) -> NotifyPayload | None:
        for p in self.payloads:
            if isinstance(p.body, NotifyPayload) and p.body.type == ntype:
                return p.body
        return None


def decode_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise MessageError("shorter than the IKE header")
    h = Header(*HEADER.unpack_from(data))
    if h.length != len(data):
        raise MessageError("header length does not match the datagram")
    return h


def _pull_chain(
    msg: Message, data: bytes, start: int, end: int, first: int, *, outer: bool
) -> None:
    pos = start
    ptype = first
    while ptype != PayloadType.NONE:
        if len(msg.payloads) >= MAX_PAYLOADS:
            raise MessageError("too many payloads")
        if pos + 4 > end:
            raise MessageError("payload header past the end")
        nxt, flags, length = GENERIC.unpack_from(data, pos)
        if length < 4 or pos + length > end:
            raise MessageError("payload length out of bounds")
        critical = bool(flags & 0x80)
        if outer and ptype == PayloadType.SK:
            # §3.14: SK is the last payload; its Next Payload names the first inner one.
            if pos + length != end:
                raise MessageError("SK payload is not last")
            msg.sk_offset = pos
            msg.sk_first = nxt
            return
        if ptype not in KNOWN_TYPES:
            if critical and msg.unknown_critical is None:
                msg.unknown_critical = ptype
            pos += length
            ptype = nxt
            continue
        try:
            body = pull_body(ptype, data[pos + 4 : pos + length], critical)
        except (BufferReadError, ValueError) as exc:
            raise MessageError(f"bad payload {ptype}: {exc}") from None
        msg.payloads.append(Payload(ptype, body))
        pos += length
        ptype = nxt
    if pos != end:
        raise MessageError("data after the last payload")


def decode(data: bytes) -> Message:
    """Header and the cleartext payload chain; SK is located but not opened."""
    h = decode_header(data)
    msg = Message(h, raw=data)
    _pull_chain(msg, data, HEADER_LEN, len(data), h.next_payload, outer=True)
    return msg


def open_sk(msg: Message, cipher: SkCipher) -> None:
    """Decrypt the SK payload and append its inner payloads (CryptoError, MessageError)."""
    assert msg.sk_offset is not None
    plain = cipher.open(msg.raw, msg.sk_offset)
    _pull_chain(msg, plain, 0, len(plain), msg.sk_first, outer=False)


def push_chain(payloads: list[Payload]) -> tuple[int, bytes]:
    """(first payload type, encoded chain)."""
    out = bytearray()
    for i, p in enumerate(payloads):
        body = push_body(p.body)
        nxt = payloads[i + 1].type if i + 1 < len(payloads) else 0
        critical = 0x80 if isinstance(p.body, RawPayload) and p.body.critical else 0
        out += GENERIC.pack(nxt, critical, 4 + len(body)) + body
    return (payloads[0].type if payloads else 0), bytes(out)


def encode(
    *,
    spi_i: bytes,
    spi_r: bytes,
    exchange: int,
    flags: int,
    message_id: int,
    payloads: list[Payload],
    cipher: SkCipher | None = None,
    iv: bytes = b"",
) -> bytes:
    """A whole message; with ``cipher`` the payloads go inside an SK payload."""
    first, chain = push_chain(payloads)
    if cipher is None:
        length = HEADER_LEN + len(chain)
        header = HEADER.pack(spi_i, spi_r, first, IKE_VERSION, exchange, flags, message_id, length)
        return header + chain
    sk_len = 4 + cipher.overhead(len(chain))
    length = HEADER_LEN + sk_len
    header = HEADER.pack(
        spi_i, spi_r, PayloadType.SK, IKE_VERSION, exchange, flags, message_id, length
    )
    sk_header = GENERIC.pack(first, 0, sk_len)
    return header + sk_header + cipher.seal(header, sk_header, chain, iv)


__all__ = [
    "FLAG_INITIATOR",
    "FLAG_RESPONSE",
    "HEADER_LEN",
    "Buffer",
    "Header",
    "Message",
    "MessageError",
    "decode",
    "decode_header",
    "encode",
    "open_sk",
]
