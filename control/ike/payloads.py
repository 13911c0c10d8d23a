"""IKEv2 payload codec: a bounds-checked cursor and ``pull_x`` / ``push_x`` pairs.

Every read goes through :class:`Buffer`, which raises :class:`BufferError`
(→ INVALID_SYNTAX) instead of returning short data. Wire figures are those of
RFC 7296 §3 (https://www.rfc-editor.org/rfc/rfc7296#section-3); each function
names its section.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum


class BufferReadError(ValueError):
    """Read past the end of a payload or message."""


class Buffer:
    """A read cursor over bytes; every pull is bounds-checked."""

    __slots__ = ("_data", "_end", "pos")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self._data = data
        self.pos = start
        self._end = len(data) if end is None else end
        if self._end > len(data) or start > self._end:
            raise BufferReadError("bounds outside the data")

    def eof(self) -> bool:
        return self.pos >= self._end

    @property
    def remaining(self) -> int:
        return self._end - self.pos

    def pull_bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self._end:
            raise BufferReadError("read past end")
        v = self._data[self.pos : self.pos + n]
        self.pos += n
        return v

    def pull_uint8(self) -> int:
        if self.pos + 1 > self._end:
            raise BufferReadError("read past end")
        v = self._data[self.pos]
        self.pos += 1
        return v

    def pull_uint16(self) -> int:
        if self.pos + 2 > self._end:
            raise BufferReadError("read past end")
        (v,) = _U16.unpack_from(self._data, self.pos)
        self.pos += 2
        return int(v)

    def pull_uint32(self) -> int:
        if self.pos + 4 > self._end:
            raise BufferReadError("read past end")
        (v,) = _U32.unpack_from(self._data, self.pos)
        self.pos += 4
        return int(v)

    def pull_rest(self) -> bytes:
        return self.pull_bytes(self._end - self.pos)


_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class PayloadType(IntEnum):
    """IANA "IKEv2 Payload Types" (RFC 7296 §3.2)."""

    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class ExchangeType(IntEnum):
    """RFC 7296 §3.1."""

    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class Protocol(IntEnum):
    """Protocol ID in proposals, notifies and deletes (§3.3.1)."""

    NONE = 0
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(IntEnum):
    """§3.3.2."""

    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class IdType(IntEnum):
    """§3.5."""

    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    DER_ASN1_GN = 10
    KEY_ID = 11


class AuthMethod(IntEnum):
    """§3.8."""

    RSA = 1
    PSK = 2
    DSS = 3


class TsType(IntEnum):
    """§3.13.1."""

    IPV4_ADDR_RANGE = 7
    IPV6_ADDR_RANGE = 8


class Notify(IntEnum):
    """IANA "IKEv2 Notify Message Types" — the ones we send or act on (§3.10.1)."""

    # errors
    UNSUPPORTED_CRITICAL_PAYLOAD = 1
    INVALID_IKE_SPI = 4
    INVALID_MAJOR_VERSION = 5
    INVALID_SYNTAX = 7
    INVALID_MESSAGE_ID = 9
    INVALID_SPI = 11
    NO_PROPOSAL_CHOSEN = 14
    INVALID_KE_PAYLOAD = 17
    AUTHENTICATION_FAILED = 24
    SINGLE_PAIR_REQUIRED = 34
    NO_ADDITIONAL_SAS = 35
    INTERNAL_ADDRESS_FAILURE = 36
    FAILED_CP_REQUIRED = 37
    TS_UNACCEPTABLE = 38
    INVALID_SELECTORS = 39
    TEMPORARY_FAILURE = 43
    CHILD_SA_NOT_FOUND = 44
    # status
    INITIAL_CONTACT = 16384
    SET_WINDOW_SIZE = 16385
    ADDITIONAL_TS_POSSIBLE = 16386
    IPCOMP_SUPPORTED = 16387
    NAT_DETECTION_SOURCE_IP = 16388
    NAT_DETECTION_DESTINATION_IP = 16389
    COOKIE = 16390
    USE_TRANSPORT_MODE = 16391
    HTTP_CERT_LOOKUP_SUPPORTED = 16392
    REKEY_SA = 16393
    ESP_TFC_PADDING_NOT_SUPPORTED = 16394
    NON_FIRST_FRAGMENTS_ALSO = 16395
    MOBIKE_SUPPORTED = 16396
    REDIRECT_SUPPORTED = 16406
    IKEV2_FRAGMENTATION_SUPPORTED = 16430
    SIGNATURE_HASH_ALGORITHMS = 16431


def notify_name(value: int) -> str:
    try:
        return Notify(value).name
    except ValueError:
        return f"NOTIFY_{value}"


# ------------------------------------------------------------------ payloads


@dataclass(slots=True)
class Transform:
    """§3.3.2; ``key_length`` is the Key Length attribute (type 14, §3.3.5) in bits."""

    type: int
    id: int
    key_length: int | None = None


@dataclass(slots=True)
class Proposal:
    """§3.3.1."""

    num: int
    protocol: int
    spi: bytes
    transforms: list[Transform] = field(default_factory=list)


@dataclass(slots=True)
class SaPayload:
    proposals: list[Proposal]


@dataclass(slots=True)
class KePayload:
    """§3.4."""

    group: int
    data: bytes


@dataclass(slots=True)
class NoncePayload:
    """§3.9: 16..256 octets."""

    nonce: bytes


@dataclass(slots=True)
class IdPayload:
    """§3.5. ``body`` (type, reserved, data) is what AUTH signs as ID'."""

    id_type: int
    data: bytes

    @property
    def body(self) -> bytes:
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(slots=True)
class AuthPayload:
    """§3.8."""

    method: int
    data: bytes


@dataclass(slots=True)
class NotifyPayload:
    """§3.10."""

    type: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""


@dataclass(slots=True)
class DeletePayload:
    """§3.11."""

    protocol: int
    spis: list[bytes]


@dataclass(slots=True)
class VendorPayload:
    """§3.12."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Selector:
    """One §3.13.1 traffic selector, addresses as ``ipaddress`` objects."""

    ts_type: int
    protocol: int
    start_port: int
    end_port: int
    start: ipaddress.IPv4Address | ipaddress.IPv6Address
    end: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class TsPayload:
    """§3.13."""

    selectors: list[Selector]


@dataclass(slots=True)
class RawPayload:
    """A payload we carry opaquely: CP (§3.15, ignored), CERT, CERTREQ, EAP, unknown."""

    data: bytes
    critical: bool = False


Body = (
    SaPayload
    | KePayload
    | NoncePayload
    | IdPayload
    | AuthPayload
    | NotifyPayload
    | DeletePayload
    | VendorPayload
    | TsPayload
    | RawPayload
)


@dataclass(slots=True)
class Payload:
    """One payload in a chain: its type and parsed body."""

    type: int
    body: Body


# -------------------------------------------------------------- pull / push


def pull_sa(buf: Buffer) -> SaPayload:
    """§3.3: proposal substructures, each with transform substructures."""
    proposals: list[Proposal] = []
    last = 2
    while last == 2:
        if buf.eof():
            raise BufferReadError("SA payload ends before its last proposal")
        last = buf.pull_uint8()
        if last not in (0, 2):
            raise BufferReadError("bad proposal 'last substruc'")
        buf.pull_uint8()
        length = buf.pull_uint16()
        if length < 8:
            raise BufferReadError("proposal too short")
        sub = Buffer(buf.pull_bytes(length - 4))
        num = sub.pull_uint8()
        protocol = sub.pull_uint8()
        spi_size = sub.pull_uint8()
        count = sub.pull_uint8()
        spi = sub.pull_bytes(spi_size)
        transforms: list[Transform] = []
        for i in range(count):
            t_last = sub.pull_uint8()
            if t_last != (0 if i == count - 1 else 3):
                raise BufferReadError("bad transform 'last substruc'")
            sub.pull_uint8()
            t_len = sub.pull_uint16()
            if t_len < 8:
                raise BufferReadError("transform too short")
            tb = Buffer(sub.pull_bytes(t_len - 4))
            t_type = tb.pull_uint8()
            tb.pull_uint8()
            t_id = tb.pull_uint16()
            key_length: int | None = None
            while not tb.eof():
                a_type = tb.pull_uint16()
                if a_type & 0x8000:  # TV format
                    a_value = tb.pull_uint16()
                    if a_type & 0x7FFF == 14:
                        key_length = a_value
                    else:
                        # an unknown attribute makes the transform unusable (§3.3.6)
                        t_type = 0x100 | t_type
                else:
                    tb.pull_bytes(tb.pull_uint16())
                    t_type = 0x100 | t_type
            transforms.append(Transform(t_type, t_id, key_length))
        if not sub.eof():
            raise BufferReadError("proposal longer than its transforms")
        proposals.append(Proposal(num, protocol, spi, transforms))
    if not buf.eof():
        raise BufferReadError("data after last proposal")
    return SaPayload(proposals)


def push_sa(sa: SaPayload) -> bytes:
    out = bytearray()
    for pi, p in enumerate(sa.proposals):
        tbytes = bytearray()
        for ti, t in enumerate(p.transforms):
            attrs = b"" if t.key_length is None else struct.pack("!HH", 0x800E, t.key_length)
            last = 0 if ti == len(p.transforms) - 1 else 3
            tbytes += struct.pack("!BBHBBH", last, 0, 8 + len(attrs), t.type, 0, t.id) + attrs
        body = bytes([p.num, p.protocol, len(p.spi), len(p.transforms)]) + p.spi + tbytes
        last = 0 if pi == len(sa.proposals) - 1 else 2
        out += struct.pack("!BBH", last, 0, 4 + len(body)) + body
    return bytes(out)


def pull_ke(buf: Buffer) -> KePayload:
    group = buf.pull_uint16()
    buf.pull_uint16()
    return KePayload(group, buf.pull_rest())


def push_ke(p: KePayload) -> bytes:
    return struct.pack("!HH", p.group, 0) + p.data


def pull_nonce(buf: Buffer) -> NoncePayload:
    nonce = buf.pull_rest()
    if not 16 <= len(nonce) <= 256:  # §3.9
        raise BufferReadError("nonce length out of 16..256")
    return NoncePayload(nonce)


def pull_id(buf: Buffer) -> IdPayload:
    id_type = buf.pull_uint8()
    buf.pull_bytes(3)
    return IdPayload(id_type, buf.pull_rest())


def pull_auth(buf: Buffer) -> AuthPayload:
    method = buf.pull_uint8()
    buf.pull_bytes(3)
    return AuthPayload(method, buf.pull_rest())


def push_auth(p: AuthPayload) -> bytes:
    return bytes([p.method, 0, 0, 0]) + p.data


def pull_notify(buf: Buffer) -> NotifyPayload:
    protocol = buf.pull_uint8()
    spi_size = buf.pull_uint8()
    ntype = buf.pull_uint16()
    spi = buf.pull_bytes(spi_size)
    return NotifyPayload(ntype, buf.pull_rest(), protocol, spi)


def push_notify(p: NotifyPayload) -> bytes:
    return struct.pack("!BBH", p.protocol, len(p.spi), p.type) + p.spi + p.data


def pull_delete(buf: Buffer) -> DeletePayload:
    protocol = buf.pull_uint8()
    spi_size = buf.pull_uint8()
    count = buf.pull_uint16()
    if protocol == Protocol.IKE and (spi_size != 0 or count != 0):
        raise BufferReadError("IKE delete carries no SPIs")  # §3.11
    if protocol in (Protocol.ESP, Protocol.AH) and spi_size != 4:
        raise BufferReadError("ESP/AH delete needs 4-octet SPIs")
    spis = [buf.pull_bytes(spi_size) for _ in range(count)]
    if not buf.eof():
        raise BufferReadError("data after the SPIs")
    return DeletePayload(protocol, spis)


def push_delete(p: DeletePayload) -> bytes:
    size = len(p.spis[0]) if p.spis else 0
    return struct.pack("!BBH", p.protocol, size, len(p.spis)) + b"".join(p.spis)


def pull_ts(buf: Buffer) -> TsPayload:
    count = buf.pull_uint8()
    buf.pull_bytes(3)
    selectors: list[Selector] = []
    for _ in range(count):
        ts_type = buf.pull_uint8()
        protocol = buf.pull_uint8()
        length = buf.pull_uint16()
        sp = buf.pull_uint16()
        ep = buf.pull_uint16()
        if ts_type == TsType.IPV4_ADDR_RANGE and length == 16:
            a: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                buf.pull_bytes(4)
            )
            b: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                buf.pull_bytes(4)
            )
        elif ts_type == TsType.IPV6_ADDR_RANGE and length == 40:
            a = ipaddress.IPv6Address(buf.pull_bytes(16))
            b = ipaddress.IPv6Address(buf.pull_bytes(16))
        else:
            # unknown TS types cannot be narrowed; skip them (§3.13.1)
            if length < 8:
                raise BufferReadError("bad traffic selector length")
            buf.pull_bytes(length - 8)
            continue
        selectors.append(Selector(ts_type, protocol, sp, ep, a, b))
    if not buf.eof():
        raise BufferReadError("data after traffic selectors")
    return TsPayload(selectors)


def push_ts(p: TsPayload) -> bytes:
    out = bytearray([len(p.selectors), 0, 0, 0])
    for s in p.selectors:
        addr = s.start.packed + s.end.packed
        out += struct.pack("!BBHHH", s.ts_type, s.protocol, 8 + len(addr), s.start_port, s.end_port)
        out += addr
    return bytes(out)


def pull_body(ptype: int, data: bytes, critical: bool) -> Body:
    """Parse one payload body by type; opaque for the ones we do not interpret."""
    buf = Buffer(data)
    body: Body
    if ptype == PayloadType.SA:
        body = pull_sa(buf)
    elif ptype == PayloadType.KE:
        body = pull_ke(buf)
    elif ptype == PayloadType.NONCE:
        body = pull_nonce(buf)
    elif ptype in (PayloadType.IDI, PayloadType.IDR):
        body = pull_id(buf)
    elif ptype == PayloadType.AUTH:
        body = pull_auth(buf)
    elif ptype == PayloadType.NOTIFY:
        body = pull_notify(buf)
    elif ptype == PayloadType.DELETE:
        body = pull_delete(buf)
    elif ptype == PayloadType.VENDOR:
        body = VendorPayload(data)
    elif ptype in (PayloadType.TSI, PayloadType.TSR):
        body = pull_ts(buf)
    else:
        body = RawPayload(data, critical)
    return body


def push_body(body: Body) -> bytes:
    if isinstance(body, SaPayload):
        return push_sa(body)
    if isinstance(body, KePayload):
        return push_ke(body)
    if isinstance(body, NoncePayload):
        return body.nonce
    if isinstance(body, IdPayload):
        return body.body
    if isinstance(body, AuthPayload):
        return push_auth(body)
    if isinstance(body, NotifyPayload):
        return push_notify(body)
    if isinstance(body, DeletePayload):
        return push_delete(body)
    if isinstance(body, TsPayload):
        return push_ts(body)
    return body.data


KNOWN_TYPES = frozenset(int(t) for t in PayloadType) - {0}
"""Payload types we recognise; others with the critical bit set are refused (§2.5)."""
