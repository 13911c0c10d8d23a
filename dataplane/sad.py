"""The worker's Security Association Database and tunnel table, from bus records.

RFC 4301 §4.4.2 calls it the SAD: inbound, an SPI finds the SA (and with it
the account, the tunnel and the selectors to check after decryption);
outbound, a tunnel finds the SA to encrypt with — the *newest generation*
whose selectors cover the packet, so after a make-before-break rekey
(DESIGN §3) traffic moves to the new SA as soon as it is on this worker, while
the old one still decrypts what is in flight.

Cipher objects are built here, when a record arrives (DESIGN §7), by factories
the worker injects (``esp.InboundSa.from_record`` /
``esp.OutboundSa.from_record``); this module never imports the codec, so it
stays sans-IO and testable with fakes.

Tunnels: GRE tunnels are found by their outer address pair (RFC 2784 has no
SPI; DESIGN §3: "a tunnel is its pair of outer addresses").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from replication.records import Direction, SaRecord, TunnelKind, TunnelRecord

from .selectors import SaSelectors


class InboundCodec(Protocol):
    spi: int

    def decapsulate(
        self, packet: bytes | bytearray | memoryview, in_place: bool = ...
    ) -> tuple[int, memoryview]: ...


class OutboundCodec(Protocol):
    spi: int
    seq: int
    """Last sequence number sent (owner mode reads it for reservations)."""

    def overhead(self, inner_len: int) -> int: ...

    def encapsulate_into(
        self,
        out: bytearray,
        offset: int,
        inner: bytes | bytearray | memoryview,
        next_header: int,
    ) -> int: ...


_V4_ALL = 0xFFFFFFFF


def fast_v4(selectors: SaSelectors) -> tuple[int, int, int, int] | None:
    """(local start, local end, remote start, remote end) when each end of the
    SA is one IPv4 address range with any protocol and every port, the
    usual site-to-site case: the hot path then checks two ranges inline
    instead of calling :meth:`SaSelectors.inbound_ok` /
    :meth:`~SaSelectors.outbound_ok` (same answer for IPv4; an IPv6 packet
    still goes through them). None otherwise."""
    ends = []
    for side in (selectors.local, selectors.remote):
        if len(side.items) != 1:
            return None
        v, start, end, proto, sp, ep = side.items[0]
        if v != 4 or proto != 0 or sp != 0 or ep != 65535 or not 0 <= start <= end <= _V4_ALL:
            return None
        ends += [start, end]
    return ends[0], ends[1], ends[2], ends[3]


InboundFactory = Callable[[SaRecord], InboundCodec]
OutboundFactory = Callable[[SaRecord], OutboundCodec]


class InboundEntry:
    """An inbound SA as the hot path uses it. Counters are plain ints."""

    __slots__ = (
        "account_id",
        "bytes",
        "codec",
        "fast4",
        "packets",
        "record",
        "selectors",
        "spi",
        "tunnel_id",
    )

    def __init__(self, record: SaRecord, codec: InboundCodec) -> None:
        self.record = record
        self.codec = codec
        self.spi = record.spi
        self.account_id = record.account_id
        self.tunnel_id = record.tunnel_id
        self.selectors = SaSelectors(record.ts_local, record.ts_remote)
        self.fast4 = fast_v4(self.selectors)
        """:func:`fast_v4` of the selectors (None: use ``selectors``)."""
        self.packets = 0
        self.bytes = 0


class OutboundEntry:
    """An outbound SA with its destination pre-resolved."""

    __slots__ = (
        "account_id",
        "by_address",
        "bytes",
        "codec",
        "dest",
        "fast4",
        "order",
        "packets",
        "record",
        "selectors",
        "spi",
        "tunnel_id",
        "udp_encap",
    )

    def __init__(self, record: SaRecord, codec: OutboundCodec) -> None:
        self.record = record
        self.codec = codec
        self.spi = record.spi
        self.account_id = record.account_id
        self.tunnel_id = record.tunnel_id
        self.selectors = SaSelectors(record.ts_local, record.ts_remote)
        self.fast4 = fast_v4(self.selectors)
        self.by_address = all(
            proto == 0 and sp == 0 and ep == 65535
            for side in (self.selectors.local, self.selectors.remote)
            for _v, _s, _e, proto, sp, ep in side.items
        )
        """Whether the selectors name addresses only (any protocol, every
        port): whether the SA covers a packet then depends on its addresses."""
        self.udp_encap = record.udp_encap
        self.dest = (record.remote_addr, record.remote_port if record.udp_encap else 0)
        # Newest first: generation, then install time, then SPI for determinism.
        self.order = (record.generation, record.created, record.spi)
        self.packets = 0
        self.bytes = 0


class TunnelEntry:
    """A tunnel record plus its hot-path counters (per direction)."""

    __slots__ = ("bytes_in", "bytes_out", "packets_in", "packets_out", "record")

    def __init__(self, record: TunnelRecord) -> None:
        self.record = record
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0


class Sad:
    """SPI → inbound SA; tunnel → outbound SAs; GRE pair → tunnel."""

    def __init__(self, inbound_factory: InboundFactory, outbound_factory: OutboundFactory) -> None:
        self._in_factory = inbound_factory
        self._out_factory = outbound_factory
        self.inbound: dict[int, InboundEntry] = {}
        self.outbound: dict[str, list[OutboundEntry]] = {}
        """tunnel_id -> entries, newest first."""
        self._out_keys: dict[str, OutboundEntry] = {}
        self._in_keys: dict[str, int] = {}
        self.tunnels: dict[str, TunnelEntry] = {}
        self.gre: dict[tuple[str, str], TunnelEntry] = {}
        """(local_addr, remote_addr) -> GRE tunnel."""
        self._tunnel_keys: dict[str, str] = {}

    # ---- records -------------------------------------------------------
    def apply_sa(self, key: str, rec: SaRecord) -> None:
        """Install or replace an SA. Builds its cipher now, not per packet.

        Raises whatever the factory raises for an unusable record; nothing
        is changed in that case.
        """
        if rec.direction is Direction.IN:
            codec_in = self._in_factory(rec)
            old_spi = self._in_keys.get(key)
            if old_spi is not None and old_spi != rec.spi:
                self.inbound.pop(old_spi, None)
            self.inbound[rec.spi] = InboundEntry(rec, codec_in)
            self._in_keys[key] = rec.spi
            return
        entry = OutboundEntry(rec, self._out_factory(rec))
        self._remove_out(key)
        self._out_keys[key] = entry
        lst = self.outbound.setdefault(rec.tunnel_id, [])
        lst.append(entry)
        lst.sort(key=lambda e: e.order, reverse=True)

    def delete_sa(self, key: str) -> None:
        spi = self._in_keys.pop(key, None)
        if spi is not None:
            self.inbound.pop(spi, None)
            return
        self._remove_out(key)

    def _remove_out(self, key: str) -> None:
        old = self._out_keys.pop(key, None)
        if old is None:
            return
        lst = self.outbound.get(old.tunnel_id)
        if lst is not None:
            lst[:] = [e for e in lst if e is not old]
            if not lst:
                del self.outbound[old.tunnel_id]

    def apply_tunnel(self, key: str, rec: TunnelRecord) -> TunnelEntry:
        self.delete_tunnel(key)
        entry = self.tunnels.get(rec.tunnel_id)
        if entry is None:
            entry = TunnelEntry(rec)
        else:  # keep counters across updates of the same tunnel
            entry.record = rec
        self.tunnels[rec.tunnel_id] = entry
        self._tunnel_keys[key] = rec.tunnel_id
        if rec.kind is TunnelKind.GRE and rec.remote_addr is not None:
            self.gre[(rec.local_addr, rec.remote_addr)] = entry
        return entry

    def delete_tunnel(self, key: str) -> TunnelRecord | None:
        tid = self._tunnel_keys.pop(key, None)
        if tid is None:
            return None
        entry = self.tunnels.pop(tid, None)
        if entry is None:
            return None
        rec = entry.record
        if rec.remote_addr is not None and self.gre.get((rec.local_addr, rec.remote_addr)) is entry:
            del self.gre[(rec.local_addr, rec.remote_addr)]
        return rec

    def expire(self, now: float) -> list[str]:
        """Drop SAs past ``expire_at`` (unix time); returns their keys."""
        gone = [k for k, spi in self._in_keys.items() if _expired(self.inbound[spi].record, now)]
        gone += [k for k, e in self._out_keys.items() if _expired(e.record, now)]
        for k in gone:
            self.delete_sa(k)
        return gone

    # ---- lookups (hot path) ---------------------------------------------
    def outbound_for(
        self, tunnel_id: str, version: int, src: int, dst: int, proto: int, sport: int, dport: int
    ) -> OutboundEntry | None:
        """The newest-generation outbound SA of the tunnel covering the flow."""
        lst = self.outbound.get(tunnel_id)
        if lst is None:
            return None
        for entry in lst:
            f4 = entry.fast4
            if f4 is not None and version == 4:
                # outbound: source in the local range, destination in the remote one
                if f4[0] <= src <= f4[1] and f4[2] <= dst <= f4[3]:
                    return entry
            elif entry.selectors.outbound_ok(version, src, dst, proto, sport, dport):
                return entry
        return None

    def tunnel_usable(self, tunnel_id: str) -> bool:
        """Whether outbound traffic to the tunnel can be sent right now."""
        entry = self.tunnels.get(tunnel_id)
        if entry is None:
            return False
        if entry.record.kind is TunnelKind.GRE:
            return entry.record.remote_addr is not None
        return bool(self.outbound.get(tunnel_id))

    @property
    def sa_count(self) -> int:
        return len(self.inbound) + len(self._out_keys)


def _expired(rec: SaRecord, now: float) -> bool:
    return rec.expire_at != 0 and rec.expire_at <= now
