"""The replicated state: record types, their keys and their msgpack encoding.

Everything a worker knows arrives as one of these records (DESIGN §4). This
module is the contract between control (which produces records), the bus
(which moves opaque bytes under string keys) and the dataplane (which builds
cipher objects from them). It is sans-IO and imports no ZeroMQ.

Wire form: a msgpack map ``{"schema": SCHEMA, "type": <record type>, <fields>...}``.
A deletion is a tombstone: the key with an empty value on the bus. Decoding is
all-or-nothing: a record with an unknown schema, an unknown or missing field,
or a value out of range raises :class:`RecordError` and nothing is applied.

Keys:

* ``tunnel/<tunnel_id>``
* ``route/<route_id>``
* ``sa/in/<spi-hex>``: inbound SPIs are chosen by us, unique cluster-wide.
* ``sa/out/<tunnel_id>/<spi-hex>``: outbound SPIs are chosen by the peer
  (RFC 7296 §3.3.1), so two peers may pick the same one; the tunnel id makes
  the key unique.
* ``seq/<tunnel_id>/<spi-hex>``: the outbound sequence checkpoint of a
  replay-protected SA (:class:`SeqCheckpoint`, DESIGN §5).
* ``rwin/<spi-hex>``: the inbound replay-window checkpoint of an SA with a
  replay window (:class:`ReplayCheckpoint`, DESIGN §5).
* ``worker/<node>/<index>``: a live worker and its handoff address for
  replay-protected SAs (:class:`WorkerRecord`, DESIGN §5).
* ``ike/<spi-hex>`` is reserved for IKE SA failover.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar

import msgpack

SCHEMA = 1
"""Bumped on any incompatible change; subscribers reject other versions."""


class RecordError(ValueError):
    """A record that cannot be applied. ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class TunnelKind(StrEnum):
    IPSEC = "ipsec"
    GRE = "gre"


class Cipher(StrEnum):
    """ESP encryption transforms in scope (DESIGN §3), strongSwan's names."""

    AES128GCM16 = "aes128gcm16"
    AES256GCM16 = "aes256gcm16"
    AES128CBC = "aes128"
    AES256CBC = "aes256"
    NULL = "null"


class Integ(StrEnum):
    """ESP integrity transforms; NONE only with an AEAD cipher."""

    NONE = "none"
    SHA256_128 = "sha256_128"
    SHA1_96 = "sha1_96"


CIPHER_KEY_BYTES: dict[Cipher, int] = {
    Cipher.AES128GCM16: 16,
    Cipher.AES256GCM16: 32,
    Cipher.AES128CBC: 16,
    Cipher.AES256CBC: 32,
    Cipher.NULL: 0,
}
AEAD_CIPHERS = frozenset({Cipher.AES128GCM16, Cipher.AES256GCM16})
INTEG_KEY_BYTES: dict[Integ, int] = {Integ.NONE: 0, Integ.SHA256_128: 32, Integ.SHA1_96: 20}
GCM_SALT_BYTES = 4
"""RFC 4106 §8.1: the last four octets of the KEYMAT slice are the salt."""

MAX_REPLAY_WINDOW = 4096
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


_ip_address = functools.lru_cache(maxsize=4096)(ipaddress.ip_address)
"""Parsing addresses is most of decode()'s cost and records repeat the same
few (anycast address, peers, selectors); address objects are immutable."""


def _check(cond: bool, detail: str) -> None:
    if not cond:
        raise RecordError("invalid", detail)


def _check_addr(value: str | None, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(isinstance(value, str), f"{name} must be an address string")
    try:
        _ip_address(value)
    except ValueError:
        raise RecordError("invalid", f"{name} is not an IP address") from None


def _check_int(value: object, name: str, lo: int, hi: int) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        f"{name} must be an integer in [{lo}, {hi}]",
    )


def _check_bool(value: object, name: str) -> None:
    _check(isinstance(value, bool), f"{name} must be a boolean")


def _check_ids(account_id: object, tunnel_id: object) -> None:
    _check(isinstance(account_id, str) and bool(_ACCOUNT.match(account_id)), "bad account_id")
    _check(isinstance(tunnel_id, str) and bool(_HEX32.match(tunnel_id)), "bad tunnel_id")


@dataclass(frozen=True, slots=True)
class TrafficSelector:
    """One traffic selector, RFC 7296 §3.13.1: an address range, a protocol
    (0 = any) and a port range. IPv4 or IPv6 by the addresses' family."""

    start: str
    end: str
    protocol: int = 0
    start_port: int = 0
    end_port: int = 65535

    def __post_init__(self) -> None:
        _check_addr(self.start, "ts.start")
        _check_addr(self.end, "ts.end")
        a, b = _ip_address(self.start), _ip_address(self.end)
        _check(a.version == b.version, "ts start and end differ in family")
        _check(int(a) <= int(b), "ts start > end")
        _check_int(self.protocol, "ts.protocol", 0, 255)
        _check_int(self.start_port, "ts.start_port", 0, 65535)
        _check_int(self.end_port, "ts.end_port", 0, 65535)
        _check(self.start_port <= self.end_port, "ts start_port > end_port")

    @classmethod
    def from_network(cls, cidr: str) -> TrafficSelector:
        net = ipaddress.ip_network(cidr, strict=False)
        return cls(str(net.network_address), str(net.broadcast_address))

    @property
    def version(self) -> int:
        return _ip_address(self.start).version

    def to_wire(self) -> list[object]:
        return [self.start, self.end, self.protocol, self.start_port, self.end_port]

    @classmethod
    def from_wire(cls, value: object) -> TrafficSelector:
        _check(isinstance(value, list) and len(value) == 5, "ts must be a 5-element list")
        assert isinstance(value, list)
        # Selectors repeat across a tunnel's SAs; instances are frozen, so a
        # validated one can be shared. The key holds each element's type, so
        # True or 1.0 never hits a cached 1 and skips validation.
        try:
            key = tuple((type(v), v) for v in value)
            return _ts_from_key(key)
        except TypeError:  # an unhashable element: validation rejects it below
            return cls(*value)


@functools.lru_cache(maxsize=4096)
def _ts_from_key(key: tuple[tuple[type, object], ...]) -> TrafficSelector:
    return TrafficSelector(*(v for _, v in key))  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TunnelRecord:
    """A tunnel as the dataplane needs it: outer endpoints and inner limits."""

    kind_name: ClassVar[str] = "tunnel"

    account_id: str
    tunnel_id: str
    kind: TunnelKind
    name: str
    local_addr: str
    """Our (anycast) outer address: Magic WAN's ``cloudflare_endpoint``."""
    remote_addr: str | None
    """The customer's outer address; None for an IPsec tunnel without one."""
    interface_address: str
    """Our side of the tunnel's /31 or /30, as ``a.b.c.d/len``."""
    mtu: int = 1476
    """Inner MTU: packets larger than this are fragmented or refused (DF)."""
    mss: int = 0
    """TCP MSS clamp applied to SYNs both ways; 0 derives it from ``mtu``."""
    replay_protection: bool = False
    allow_null_cipher: bool = False
    ttl: int = 64
    """Outer TTL for GRE."""
    gre_key: int | None = None
    """RFC 2890 key to send and to expect, if the customer router uses one."""

    def __post_init__(self) -> None:
        _check_ids(self.account_id, self.tunnel_id)
        _check(self.kind in TunnelKind.__members__.values(), "bad tunnel kind")
        _check(isinstance(self.name, str) and 0 < len(self.name) <= 255, "bad name")
        _check_addr(self.local_addr, "local_addr")
        _check_addr(self.remote_addr, "remote_addr", optional=self.kind is TunnelKind.IPSEC)
        # ipaddress also takes ints and packed bytes; the wire form is text.
        _check(isinstance(self.interface_address, str), "interface_address must be a string")
        try:
            ipaddress.ip_interface(self.interface_address)
        except ValueError:
            raise RecordError("invalid", "interface_address is not an address/len") from None
        _check_int(self.mtu, "mtu", 576, 9000)
        _check_int(self.mss, "mss", 0, 65535)
        _check_bool(self.replay_protection, "replay_protection")
        _check_bool(self.allow_null_cipher, "allow_null_cipher")
        _check_int(self.ttl, "ttl", 1, 255)
        if self.gre_key is not None:
            _check_int(self.gre_key, "gre_key", 0, 0xFFFFFFFF)

    @property
    def key(self) -> str:
        return f"tunnel/{self.tunnel_id}"


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """A static route, prefix → tunnel, as in Magic WAN's route table.

    Control resolves the API's ``nexthop`` to the tunnel; equal ``priority``
    routes share traffic by ``weight`` (ECMP), lower priority value wins.
    """

    kind_name: ClassVar[str] = "route"

    account_id: str
    route_id: str
    prefix: str
    tunnel_id: str
    priority: int = 100
    weight: int = 100

    def __post_init__(self) -> None:
        _check_ids(self.account_id, self.tunnel_id)
        _check(isinstance(self.route_id, str) and bool(_HEX32.match(self.route_id)), "bad route_id")
        _check(isinstance(self.prefix, str), "prefix must be a string")
        try:
            ipaddress.ip_network(self.prefix)
        except (ValueError, TypeError):
            raise RecordError("invalid", "prefix is not a network") from None
        _check_int(self.priority, "priority", 0, 65535)
        _check_int(self.weight, "weight", 1, 65535)

    @property
    def key(self) -> str:
        return f"route/{self.route_id}"


@dataclass(frozen=True, slots=True)
class SaRecord:
    """One direction of a Child SA: everything needed to process a packet.

    Keys live only in this record, in process memory and on CURVE sockets;
    ``__repr__`` hides them so a stray log line cannot leak one.
    """

    kind_name: ClassVar[str] = "sa"

    account_id: str
    tunnel_id: str
    spi: int
    direction: Direction
    local_addr: str
    """Our outer address (the anycast address the peer talks to)."""
    remote_addr: str
    """The peer's current outer address (after NAT, if any)."""
    udp_encap: bool
    """RFC 3948 ESP-in-UDP; ports below are then the UDP ports."""
    local_port: int
    remote_port: int
    cipher: Cipher
    integ: Integ
    enc_key: bytes
    salt: bytes
    """4 bytes for AES-GCM (RFC 4106 §4), empty otherwise."""
    integ_key: bytes
    replay_window: int
    """Anti-replay window in packets; 0 = off (the seeds' default)."""
    ts_local: tuple[TrafficSelector, ...]
    """Our side's selectors (the virtual network behind us)."""
    ts_remote: tuple[TrafficSelector, ...]
    """The customer's side."""
    child_id: int
    """Identifies the Child SA pair across rekeys (like strongSwan's reqid)."""
    generation: int
    """Rekey count within ``child_id``; workers send on the newest."""
    created: float
    """Unix time the SA was installed."""
    rekey_at: float
    """Unix time control plans to rekey it (0 = never)."""
    expire_at: float
    """Unix time after which it must not be used (0 = never)."""
    replaces: int = 0
    """SPI of the SA this one rekeyed (same direction), or 0."""

    def __post_init__(self) -> None:
        _check_ids(self.account_id, self.tunnel_id)
        _check_int(self.spi, "spi", 256, 0xFFFFFFFF)  # RFC 4303 §2.1: 1-255 reserved
        _check(self.direction in Direction.__members__.values(), "bad direction")
        _check_addr(self.local_addr, "local_addr")
        _check_addr(self.remote_addr, "remote_addr")
        _check_bool(self.udp_encap, "udp_encap")
        _check_int(self.local_port, "local_port", 0, 65535)
        _check_int(self.remote_port, "remote_port", 0, 65535)
        _check(self.cipher in Cipher.__members__.values(), "bad cipher")
        _check(self.integ in Integ.__members__.values(), "bad integ")
        cipher, integ = Cipher(self.cipher), Integ(self.integ)
        for name in ("enc_key", "salt", "integ_key"):
            _check(isinstance(getattr(self, name), bytes), f"{name} must be bytes")
        _check(len(self.enc_key) == CIPHER_KEY_BYTES[cipher], "enc_key length")
        aead = cipher in AEAD_CIPHERS
        _check(len(self.salt) == (GCM_SALT_BYTES if aead else 0), "salt length")
        _check((integ is Integ.NONE) == aead, "AEAD takes no integ; others need one")
        _check(len(self.integ_key) == INTEG_KEY_BYTES[integ], "integ_key length")
        _check_int(self.replay_window, "replay_window", 0, MAX_REPLAY_WINDOW)
        for ts in (*self.ts_local, *self.ts_remote):
            _check(isinstance(ts, TrafficSelector), "selectors must be TrafficSelector")
        _check(bool(self.ts_local) and bool(self.ts_remote), "selectors must not be empty")
        _check_int(self.child_id, "child_id", 0, 2**63 - 1)
        _check_int(self.generation, "generation", 0, 2**63 - 1)
        _check_int(self.replaces, "replaces", 0, 0xFFFFFFFF)
        for name in ("created", "rekey_at", "expire_at"):
            value = getattr(self, name)
            _check(isinstance(value, int | float) and value >= 0, f"{name} must be >= 0")

    def __repr__(self) -> str:
        return (
            f"SaRecord(spi=0x{self.spi:08x}, direction={self.direction.value}, "
            f"tunnel_id={self.tunnel_id}, cipher={self.cipher.value}, keys=<hidden>)"
        )

    @property
    def key(self) -> str:
        if self.direction is Direction.IN:
            return f"sa/in/{self.spi:08x}"
        return f"sa/out/{self.tunnel_id}/{self.spi:08x}"


@dataclass(frozen=True, slots=True)
class SeqCheckpoint:
    """Where the owner of a replay-protected outbound SA is in its sequence
    space (DESIGN §5), replicated so an owner on any node can take over.

    ``next_seq``: the owner sends no sequence number at or above it without
    first reporting a higher one (it is the end of the owner's reservation).
    Control publishes the highest value reported by any worker and never
    lowers it; a new owner starts at ``next_seq`` plus a safety jump."""

    kind_name: ClassVar[str] = "seq"

    account_id: str
    tunnel_id: str
    spi: int
    next_seq: int

    def __post_init__(self) -> None:
        _check_ids(self.account_id, self.tunnel_id)
        _check_int(self.spi, "spi", 256, 0xFFFFFFFF)
        _check_int(self.next_seq, "next_seq", 1, (1 << 64) - 1)

    @property
    def key(self) -> str:
        return f"seq/{self.tunnel_id}/{self.spi:08x}"


@dataclass(frozen=True, slots=True)
class ReplayCheckpoint:
    """The highest authenticated sequence number any worker accepted on an
    inbound SA with a replay window (DESIGN §5: inbound replay windows are
    per worker and checkpointed). Control publishes the highest ``top`` the
    live workers reported and never lowers it; a worker whose window is
    below it raises the window to it (everything at or below ``top`` then
    counts as received), so a packet another worker accepted before the
    checkpoint cannot be replayed to this one."""

    kind_name: ClassVar[str] = "rwin"

    account_id: str
    tunnel_id: str
    spi: int
    top: int

    def __post_init__(self) -> None:
        _check_ids(self.account_id, self.tunnel_id)
        _check_int(self.spi, "spi", 256, 0xFFFFFFFF)
        _check_int(self.top, "top", 1, 0xFFFFFFFF)  # no ESN (DESIGN §3)

    @property
    def key(self) -> str:
        return f"rwin/{self.spi:08x}"


_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HANDOFF_KEY_BYTES = 32
"""AES-256-GCM key of a node's cross-node handoff endpoint."""


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A live worker, as control sees it from its bus acks (DESIGN §5).

    Workers elect the owner of a replay-protected SA by rendezvous hashing
    over the nodes these records name, then over the owner node's workers;
    a non-owner on another node hands the cleartext to the owner's node as
    AES-256-GCM datagrams to ``handoff_addr``:``handoff_port`` (the node's
    address on its cluster network, a port all its workers share) under
    ``handoff_key``, the node's random key (its workers share it). The key
    travels like SA keys (CURVE bus, memory; on the node a 0600 file);
    ``__repr__`` hides it."""

    kind_name: ClassVar[str] = "worker"

    node: str
    index: int
    handoff_addr: str
    handoff_port: int
    handoff_key: bytes

    def __post_init__(self) -> None:
        _check(isinstance(self.node, str) and bool(_NODE.match(self.node)), "bad node name")
        _check_int(self.index, "index", 0, 255)
        _check_addr(self.handoff_addr, "handoff_addr")
        _check_int(self.handoff_port, "handoff_port", 1, 65535)
        _check(
            isinstance(self.handoff_key, bytes) and len(self.handoff_key) == HANDOFF_KEY_BYTES,
            "handoff_key must be 32 bytes",
        )

    def __repr__(self) -> str:
        return (
            f"WorkerRecord(node={self.node}, index={self.index}, "
            f"handoff={self.handoff_addr}:{self.handoff_port}, key=<hidden>)"
        )

    @property
    def worker_id(self) -> str:
        """The worker's id on the bus (``<node>/<index>``)."""
        return f"{self.node}/{self.index}"

    @property
    def key(self) -> str:
        return f"worker/{self.node}/{self.index}"


Record = TunnelRecord | RouteRecord | SaRecord | SeqCheckpoint | ReplayCheckpoint | WorkerRecord
_KINDS: dict[
    str,
    type[TunnelRecord]
    | type[RouteRecord]
    | type[SaRecord]
    | type[SeqCheckpoint]
    | type[ReplayCheckpoint]
    | type[WorkerRecord],
] = {
    "tunnel": TunnelRecord,
    "route": RouteRecord,
    "sa": SaRecord,
    "seq": SeqCheckpoint,
    "rwin": ReplayCheckpoint,
    "worker": WorkerRecord,
}
_FIELD_NAMES: dict[type, frozenset[str]] = {
    cls: frozenset(f.name for f in fields(cls)) for cls in _KINDS.values()
}
_ENUMS: dict[str, type[StrEnum]] = {
    "kind": TunnelKind,
    "direction": Direction,
    "cipher": Cipher,
    "integ": Integ,
}


def encode(record: Record) -> bytes:
    """Serialise a record for the bus (msgpack map with schema and kind)."""
    if type(record) is SaRecord:
        return _encode_sa(record)
    return encode_generic(record)


def encode_generic(record: Record) -> bytes:
    """:func:`encode` field by field for any record (the reference for the
    SaRecord fast path: both give the same bytes)."""
    out: dict[str, Any] = {"schema": SCHEMA, "type": record.kind_name}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name in ("ts_local", "ts_remote"):
            value = [ts.to_wire() for ts in value]
        elif isinstance(value, StrEnum):
            value = value.value
        out[f.name] = value
    data: bytes = msgpack.packb(out, use_bin_type=True)
    return data


def decode(data: bytes) -> Record:
    """Parse and validate one record; :class:`RecordError` on anything wrong."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=1 << 16)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError("malformed", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise RecordError("malformed", "record is not a map")
    if obj.get("type") == "sa" and obj.get("schema") == SCHEMA:
        fast = _fast_sa(obj)
        if fast is not None:
            return fast
    return _decode_map(obj)


def decode_checked(data: bytes) -> Record:
    """:func:`decode` without the SaRecord fast path (every field through the
    dataclass validation); the reference the fast path is tested against."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=1 << 16)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RecordError("malformed", f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise RecordError("malformed", "record is not a map")
    return _decode_map(obj)


def _decode_map(obj: dict[Any, Any]) -> Record:
    if obj.get("schema") != SCHEMA:
        raise RecordError("version", f"unsupported schema {obj.get('schema')!r}")
    kind = obj.get("type")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None  # a list is unhashable
    if cls is None:
        raise RecordError("malformed", f"unknown record type {kind!r}")
    names = _FIELD_NAMES[cls]
    given = set(obj) - {"schema", "type"}
    if given - names:
        # Keys may be str or bytes (strict_map_key allows both), which do not sort together.
        raise RecordError("malformed", f"unknown fields {sorted(map(str, given - names))}")
    kwargs: dict[str, Any] = {}
    for name in given:
        value = obj[name]
        if name in ("ts_local", "ts_remote"):
            if not isinstance(value, list):
                raise RecordError("invalid", f"{name} must be a list")
            value = tuple(TrafficSelector.from_wire(v) for v in value)
        elif name in _ENUMS:
            try:
                value = _ENUMS[name](value)
            except ValueError:
                raise RecordError("invalid", f"bad {name}") from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        raise RecordError("malformed", f"missing fields for {cls.kind_name}") from None


# --- SaRecord fast path -------------------------------------------------------------
#
# SaRecords are what the bus carries most (two per Child SA, again on every
# rekey), and the dataclass validation above costs ~15 us per record in
# function calls. _fast_sa() accepts only the common, exactly typed shape and
# checks the same rules straight-line; anything else (a bool where an int
# goes, a missing or unknown field, a value out of range, a bad selector)
# returns None and goes through _decode_map(), which accepts or rejects it
# with the usual reason. So the fast path never accepts what the full
# validation would reject (tests/replication/test_records_fast.py compares
# both on mutated records), it only gets there sooner.

_DIRECTIONS = {d.value: d for d in Direction}
_CIPHERS = {c.value: c for c in Cipher}
_INTEGS = {i.value: i for i in Integ}
_SA_FIELDS = 2 + len(_FIELD_NAMES[SaRecord])
"""Map entries of a full SaRecord: schema, type and every field (``replaces`` included)."""
_TS_FAST: dict[tuple[object, ...], TrafficSelector] = {}
_U32 = 0xFFFFFFFF
_I63 = 2**63 - 1
_new = object.__new__
_set = object.__setattr__


def _encode_sa(r: SaRecord) -> bytes:
    # Field order as in encode_generic() (the dataclass order): equal records
    # must give equal bytes, the bus compares values as bytes. Enums pack as
    # their string value (StrEnum is a str).
    data: bytes = _packb(
        {
            "schema": SCHEMA,
            "type": "sa",
            "account_id": r.account_id,
            "tunnel_id": r.tunnel_id,
            "spi": r.spi,
            "direction": r.direction,
            "local_addr": r.local_addr,
            "remote_addr": r.remote_addr,
            "udp_encap": r.udp_encap,
            "local_port": r.local_port,
            "remote_port": r.remote_port,
            "cipher": r.cipher,
            "integ": r.integ,
            "enc_key": r.enc_key,
            "salt": r.salt,
            "integ_key": r.integ_key,
            "replay_window": r.replay_window,
            "ts_local": [ts.to_wire() for ts in r.ts_local],
            "ts_remote": [ts.to_wire() for ts in r.ts_remote],
            "child_id": r.child_id,
            "generation": r.generation,
            "created": r.created,
            "rekey_at": r.rekey_at,
            "expire_at": r.expire_at,
            "replaces": r.replaces,
        },
        use_bin_type=True,
    )
    return data


_packb = msgpack.packb


def _fast_ts(values: object) -> tuple[TrafficSelector, ...] | None:
    if type(values) is not list or not values:
        return None
    out = []
    for v in values:
        # Exact element types, so a cached selector is never hit by True or 1.0.
        if (
            type(v) is not list
            or len(v) != 5
            or type(v[0]) is not str
            or type(v[1]) is not str
            or type(v[2]) is not int
            or type(v[3]) is not int
            or type(v[4]) is not int
        ):
            return None
        key = tuple(v)
        ts = _TS_FAST.get(key)
        if ts is None:
            try:
                ts = TrafficSelector(*key)
            except RecordError:
                return None
            if len(_TS_FAST) >= 4096:
                _TS_FAST.clear()
            _TS_FAST[key] = ts
        out.append(ts)
    return tuple(out)


def _fast_sa(obj: dict[Any, Any]) -> SaRecord | None:
    """A validated SaRecord from a decoded map of the common shape, or None."""
    g: Callable[..., Any] = obj.get
    account_id, tunnel_id = g("account_id"), g("tunnel_id")
    spi, lport, rport = g("spi"), g("local_port"), g("remote_port")
    laddr, raddr = g("local_addr"), g("remote_addr")
    enc_key, salt, integ_key = g("enc_key"), g("salt"), g("integ_key")
    window, child_id, gen = g("replay_window"), g("child_id"), g("generation")
    created, rekey_at, expire_at = g("created"), g("rekey_at"), g("expire_at")
    replaces = g("replaces", 0)
    udp_encap = g("udp_encap")
    d, c, i = g("direction"), g("cipher"), g("integ")
    if (
        len(obj) != _SA_FIELDS - ("replaces" not in obj)
        or type(account_id) is not str
        or type(tunnel_id) is not str
        or type(laddr) is not str
        or type(raddr) is not str
        or type(d) is not str
        or type(c) is not str
        or type(i) is not str
        or type(spi) is not int
        or type(lport) is not int
        or type(rport) is not int
        or type(window) is not int
        or type(child_id) is not int
        or type(gen) is not int
        or type(replaces) is not int
        or type(udp_encap) is not bool
        or type(enc_key) is not bytes
        or type(salt) is not bytes
        or type(integ_key) is not bytes
        or type(created) not in (int, float)
        or type(rekey_at) not in (int, float)
        or type(expire_at) not in (int, float)
        or not 256 <= spi <= _U32
        or not 0 <= lport <= 65535
        or not 0 <= rport <= 65535
        or not 0 <= window <= MAX_REPLAY_WINDOW
        or not 0 <= child_id <= _I63
        or not 0 <= gen <= _I63
        or not 0 <= replaces <= _U32
        or not created >= 0
        or not rekey_at >= 0
        or not expire_at >= 0
        or not _ACCOUNT.match(account_id)
        or not _HEX32.match(tunnel_id)
    ):
        return None
    direction, cipher, integ = _DIRECTIONS.get(d), _CIPHERS.get(c), _INTEGS.get(i)
    if direction is None or cipher is None or integ is None:
        return None
    aead = cipher in AEAD_CIPHERS
    if (
        len(enc_key) != CIPHER_KEY_BYTES[cipher]
        or len(salt) != (GCM_SALT_BYTES if aead else 0)
        or (integ is Integ.NONE) != aead
        or len(integ_key) != INTEG_KEY_BYTES[integ]
    ):
        return None
    try:
        _ip_address(laddr)
        _ip_address(raddr)
    except ValueError:
        return None
    ts_local, ts_remote = _fast_ts(g("ts_local")), _fast_ts(g("ts_remote"))
    if ts_local is None or ts_remote is None:
        return None
    r = _new(SaRecord)
    _set(r, "account_id", account_id)
    _set(r, "tunnel_id", tunnel_id)
    _set(r, "spi", spi)
    _set(r, "direction", direction)
    _set(r, "local_addr", laddr)
    _set(r, "remote_addr", raddr)
    _set(r, "udp_encap", udp_encap)
    _set(r, "local_port", lport)
    _set(r, "remote_port", rport)
    _set(r, "cipher", cipher)
    _set(r, "integ", integ)
    _set(r, "enc_key", enc_key)
    _set(r, "salt", salt)
    _set(r, "integ_key", integ_key)
    _set(r, "replay_window", window)
    _set(r, "ts_local", ts_local)
    _set(r, "ts_remote", ts_remote)
    _set(r, "child_id", child_id)
    _set(r, "generation", gen)
    _set(r, "created", created)
    _set(r, "rekey_at", rekey_at)
    _set(r, "expire_at", expire_at)
    _set(r, "replaces", replaces)
    return r
