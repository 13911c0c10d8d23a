"""All IKE SAs of one control node, sans-IO (STYLE: aioquic's ``QuicConnection``).

The engine owns no socket and reads no clock. In: ``receive_datagram(data,
local, remote, now)`` and ``handle_timer(now)``. Out, pulled by the caller:
``datagrams_to_send()``, ``get_timer()`` (absolute deadline or None) and
``next_event()`` (see :mod:`control.ike.events`). ``transport.py`` is the thin
asyncio shell around it.

Datagrams are IKE messages WITHOUT the RFC 3948 non-ESP marker; the port in
``local`` (500 or 4500) says where they arrived and where replies leave from.

Beyond the aioquic-shaped core: ``child_sa_ready`` (make-before-break: the
service confirms a new Child SA is on every worker), ``delete_tunnel``, ``rekey_child``,
``rekey_ike``, ``create_child``, ``delete_child``, ``send_dpd`` (operators and
tests), ``initiate`` (a whole IKE SA as initiator: tests, benchmark),
``ike_sas`` (status), ``export_state`` / ``import_state`` (control restarts),
and ``drops`` — a Counter of bounded trigger labels (``bad_icv``,
``unknown_spi``, ``cookie_sent``, ``retransmit_answered``,
``retransmit_mismatch``, ``retransmit_moved``, …) for metrics.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import re
import secrets
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from control.ike import dh as dhmod
from control.ike import messages as wire
from control.ike.connection import IkeSa, nat_hash, offered_spi, request_hash
from control.ike.events import IkeEvent, NegotiationFailed
from control.ike.payloads import (
    ExchangeType,
    IdPayload,
    IdType,
    KePayload,
    NoncePayload,
    Notify,
    NotifyPayload,
    Payload,
    PayloadType,
    SaPayload,
)
from control.ike.proposals import (
    ALL_IKE_SUITES,
    CHILD_SUITES_NO_PFS,
    ChildSuite,
    IkeSuite,
    NoProposalChosen,
    ike_groups_offered,
    ike_sa_payload,
    select_ike,
)
from control.ike.state import Dropped, IkeState
from replication.records import TrafficSelector

Address = tuple[str, int]
Rng = Callable[[int], bytes]


def _any_v4() -> tuple[TrafficSelector, ...]:
    return (TrafficSelector("0.0.0.0", "255.255.255.255"),)


@dataclass
class IkeConfig:
    """Knobs of the IKE core. Times are seconds, on the same clock as ``now``."""

    id_suffix: str = "ipsec.anywan.example"
    """Domain part of the peer IDs: ``<tunnel_id>.<account_id>.<suffix>``."""
    child_lifetime: float = 4 * 3600
    """Child SA rekey time (the seeds: 4 h). We rekey when the peer has not."""
    ike_lifetime: float = 24 * 3600
    """IKE SA rekey time (RFC 7296 §2.18); never reauthentication."""
    rekey_jitter: float = 0.1
    """Rekey happens at lifetime × (1 − U(0, jitter)), so peers do not collide."""
    expire_margin: float = 0.1
    """A Child SA hard-expires at lifetime × (1 + margin) if not rekeyed."""
    dpd_interval: float = 30.0
    """Send an empty INFORMATIONAL (§1.4) after this long without hearing the peer."""
    retransmit_timeout: float = 2.0
    """First retransmission of our own requests (§2.1)."""
    retransmit_base: float = 1.8
    """Backoff factor between retransmissions (strongSwan's default)."""
    retransmit_tries: int = 5
    """Retransmissions before we give up and delete the IKE SA and its Child SAs."""
    half_open_timeout: float = 30.0
    """A responder IKE SA that does not finish IKE_AUTH in time is dropped."""
    cookie_threshold: int = 500
    """Half-open SAs above which IKE_SA_INIT must carry a COOKIE (§2.6)."""
    max_half_open: int = 20000
    """Hard cap on half-open SAs; above it IKE_SA_INIT is dropped (counted)."""
    max_half_open_per_peer: int = 64
    """Cap per peer IP address, so one address cannot take the whole budget."""
    max_child_sas: int = 128
    """Child SAs per IKE SA (the seeds' provider allows about 100 per tunnel)."""
    rekey_delete_delay: float = 10.0
    """Make-before-break upper bound: after a Child SA rekey we started, the old
    SA is deleted with the peer as soon as the control service reports the new
    one applied on every worker (:meth:`IkeEngine.child_sa_ready`), and at the
    latest this long after the new one was announced — so a stuck worker cannot
    keep old SAs forever (counted as ``make_before_break_timeout``). Keep it
    above the service's ``rekey_apply_timeout`` (5 s)."""
    old_ike_sa_grace: float = 5.0
    """After an IKE SA rekey we started (§2.18), the old IKE SA is deleted this
    long later, so the peer's exchanges still in flight on it (a lost response
    being retransmitted) complete from our cached answers instead of being cut."""
    peer_answer_grace: float = 180.0
    """A Child SA the PEER asked for (created by our answer) is not rekeyed by us
    until the peer shows it got that answer (its next request, §2.3) or this long
    after — the peer's whole retransmission schedule (strongSwan: ≈ 165 s), after
    which it either has the Child SA or gave the IKE SA up (§2.1, §2.4)."""
    replay_window: int = 1024
    """Anti-replay window put in SA records of tunnels with replay protection."""
    unix_time_offset: float = 0.0
    """Added to ``now`` for the Unix times in SaRecords (created, rekey_at, …);
    the transport sets ``time.time() - time.monotonic()`` when ``now`` is monotonic."""
    strict: bool = False
    """Tests only: let an internal error (a bug) raise instead of being counted."""


@dataclass(frozen=True)
class TunnelAuth:
    """What the store says about the tunnel a peer's identity names."""

    account_id: str
    tunnel_id: str
    psk: bytes = field(repr=False)
    local_addr: str
    """Our anycast address for this tunnel (Magic WAN's cloudflare_endpoint)."""
    customer_endpoint: str | None = None
    allow_null_cipher: bool = False
    replay_protection: bool = False
    local_ts: tuple[TrafficSelector, ...] = field(default_factory=_any_v4)
    """Selectors our side may offer (the virtual network behind us)."""
    remote_ts: tuple[TrafficSelector, ...] = field(default_factory=_any_v4)
    """Selectors the customer's side may claim."""


@dataclass(frozen=True)
class PeerIdentity:
    """The peer's IDi, parsed; what the engine hands to ``lookup``.

    For ``rfc822``/``fqdn``/``key_id`` the engine has already split out
    ``account_id``/``tunnel_id`` (a form that does not parse never reaches the
    lookup). For ``ipv4`` only ``address`` is set: the lookup must find the
    tunnel whose customer endpoint is that address on ``local_addr``, and only
    if that pair is unique (the seeds' rule).
    """

    kind: str
    """``rfc822``, ``fqdn``, ``key_id`` or ``ipv4``."""
    account_id: str | None
    tunnel_id: str | None
    address: str | None
    local_addr: str
    """The address the peer sent IKE to."""
    remote_addr: str
    """The address it came from (after any NAT)."""


Lookup = Callable[[PeerIdentity], TunnelAuth | None]


_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_ZERO_SPI = bytes(8)
STUCK_TIMER_RETRY = 1.0
"""Seconds before an IKE SA whose due deadline did not move is run again."""


class IkeEngine:
    """Every IKE SA of this node, both roles.

    Responder for customers; initiator for rekeys/DPD/deletes of SAs it holds,
    and (:meth:`initiate`) for a whole IKE SA — used by the tests and the benchmark.

    Hostile input never raises out of :meth:`receive_datagram`: a message that
    is not acceptable is dropped and counted in :attr:`drops` under a trigger
    label (tests assert these), or answered with the Notify RFC 7296 asks for.
    """

    def __init__(self, config: IkeConfig, lookup: Lookup, *, rng: Rng | None = None) -> None:
        """``lookup`` maps a peer identity to its tunnel (None = unknown).
        ``rng(n)`` returns n random bytes; injected so tests can be reproducible."""
        self.config = config
        self.lookup = lookup
        self.rng: Rng = rng if rng is not None else secrets.token_bytes
        self.sas: dict[bytes, IkeSa] = {}
        """Every IKE SA by OUR SPI (SPIr as responder, SPIi as initiator)."""
        self.half_open: dict[tuple[bytes, str, int, bytes], IkeSa] = {}
        """Responder SAs between IKE_SA_INIT and IKE_AUTH, by (SPIi, peer IP, port, hash)."""
        self.half_open_per_ip: Counter[str] = Counter()
        self.by_tunnel: dict[str, set[bytes]] = {}
        self.spis_in_use: set[int] = set()
        self.drops: Counter[str] = Counter()
        """Why messages were dropped or what happened, by trigger label."""
        self._out: list[tuple[bytes, Address, Address]] = []
        self._events: deque[IkeEvent] = deque()
        self._timers: list[tuple[float, int, bytes]] = []
        self._timer_seq = 0
        self._cookie_secret = self.rng(32)
        self._cookie_version = 0
        self._last_now = 0.0
        self._touched: set[bytes] = set()
        self._touched_tunnels: set[str] = set()
        self._track_touched = False  # from the first take_touched() on
        self._successor_of: dict[bytes, IkeSa] = {}
        """Restored REKEYED IKE SAs whose successor (by our SPI) is not
        imported yet: the control service imports one row at a time."""

    # ------------------------------------------------------------ the sans-IO API

    def receive_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        """Feed one IKE message (without non-ESP marker). Never raises on bad input."""
        sa: IkeSa | None = None
        self._last_now = now
        try:
            sa = self._receive(bytes(data), local, remote, now)
        except Dropped as exc:
            self.drops[exc.trigger] += 1
        except Exception:
            if self.config.strict:
                raise
            self.drops["internal_error"] += 1
        if sa is not None:
            self._schedule(sa)
            if sa.successor is not None or sa.state is IkeState.REKEYED:
                # late responses on a rekeyed IKE SA act on its successor's Child SAs
                self._schedule(sa.owner())

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]:
        """(data, local, remote) to send now; data without non-ESP marker."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """The next absolute deadline (retransmit, DPD, rekey, expiry), or None."""
        heap = self._timers
        while heap:
            when, _, spi = heap[0]
            sa = self.sas.get(spi)
            if sa is None or sa.scheduled != when:
                heapq.heappop(heap)
                continue
            return when
        return None

    def handle_timer(self, now: float) -> None:
        """Run everything due at ``now``.

        Contract with the transport: afterwards :meth:`get_timer` is None or
        later than ``now`` for every IKE SA that ran, so a shell that simply
        re-arms at ``get_timer()`` cannot spin. The handlers move every deadline
        they act on; should one not (a bug, e.g. an internal error counted in
        non-strict mode), that IKE SA is retried ``STUCK_TIMER_RETRY`` later and
        counted as ``timer_stuck``."""
        self._last_now = now
        heap = self._timers
        due: list[IkeSa] = []
        while heap and heap[0][0] <= now:
            when, _, spi = heapq.heappop(heap)
            sa = self.sas.get(spi)
            if sa is not None and sa.scheduled == when:
                sa.scheduled = None
                due.append(sa)
        for sa in due:
            try:
                sa.on_timer(now)
            except Exception:
                if self.config.strict:
                    raise
                self.drops["internal_error"] += 1
            if sa.state is not IkeState.CLOSED:
                self._schedule(sa, after=now)
            for spi in self.by_tunnel.get(sa.tunnel_id or "", set()).copy():
                other = self.sas.get(spi)
                if other is not None and other.scheduled is None:
                    self._schedule(other)

    def next_event(self) -> IkeEvent | None:
        """The next :mod:`control.ike.events` event, or None."""
        return self._events.popleft() if self._events else None

    def delete_tunnel(self, tunnel_id: str, now: float) -> None:
        """Delete every IKE SA of the tunnel: DELETE to the peer, events out now."""
        for spi in list(self.by_tunnel.get(tunnel_id, ())):
            sa = self.sas.get(spi)
            if sa is not None:
                sa.local_delete(now)
                self._schedule(sa)

    def child_sa_ready(self, tunnel_id: str, inbound_spi: int, now: float) -> bool:
        """Make-before-break (DESIGN §3): the Child SA of ``tunnel_id`` whose
        inbound (our) SPI is ``inbound_spi`` is applied on every worker.

        If it replaced an older Child SA in a rekey WE started, that old SA is
        deleted with the peer now (INFORMATIONAL DELETE, then ``ChildSaDeleted``
        with reason ``rekeyed``) instead of at the ``rekey_delete_delay``
        fallback. Returns True if so; any other SPI (a new Child SA, a rekey the
        peer started — the peer deletes the old one then —, an SA already gone,
        a repeated call) is a no-op returning False."""
        self._last_now = now
        for spi in list(self.by_tunnel.get(tunnel_id, ())):
            sa = self.sas.get(spi)
            if sa is not None and sa.child_ready(inbound_spi, now):
                self._schedule(sa)
                return True
        return False

    # ------------------------------------------------------------ more control

    def ike_sas(self, tunnel_id: str | None = None) -> list[IkeSa]:
        """Established (or rekeyed/deleting) IKE SAs, optionally of one tunnel."""
        if tunnel_id is not None:
            spis = self.by_tunnel.get(tunnel_id, set())
            return [self.sas[s] for s in spis if s in self.sas]
        return [sa for sa in self.sas.values() if sa.tunnel is not None]

    def _active(self, tunnel_id: str) -> IkeSa | None:
        for sa in self.ike_sas(tunnel_id):
            if sa.state is IkeState.ESTABLISHED:
                return sa
        return None

    def rekey_child(self, tunnel_id: str, now: float, spi_in: int | None = None) -> bool:
        """Start a Child SA rekey now (tests, operators). False if nothing to rekey."""
        sa = self._active(tunnel_id)
        if sa is None:
            return False
        live = [c for c in sa.children.values() if not c.rekeyed and not c.deleting]
        if spi_in is not None:
            live = [c for c in live if c.spi_in == spi_in]
        if not live:
            return False
        sa.request("rekey_child", live[0].spi_in)
        sa.pump(now)
        self._schedule(sa)
        return True

    def rekey_ike(self, tunnel_id: str, now: float) -> bool:
        sa = self._active(tunnel_id)
        if sa is None:
            return False
        sa.request("rekey_ike", None)
        sa.pump(now)
        self._schedule(sa)
        return True

    def create_child(
        self,
        tunnel_id: str,
        now: float,
        suites: list[ChildSuite] | None = None,
        pfs_group: int | None = None,
    ) -> bool:
        """An additional Child SA over an established IKE SA (§1.3.1)."""
        sa = self._active(tunnel_id)
        if sa is None:
            return False
        sa.request("new_child", (suites or CHILD_SUITES_NO_PFS, pfs_group, 0))
        sa.pump(now)
        self._schedule(sa)
        return True

    def delete_child(self, tunnel_id: str, spi_in: int, now: float) -> bool:
        sa = self._active(tunnel_id)
        if sa is None or spi_in not in sa.children:
            return False
        sa.children[spi_in].deleting = True
        sa.request("delete_child", (spi_in, "local_delete"))
        sa.pump(now)
        self._schedule(sa)
        return True

    def send_dpd(self, tunnel_id: str, now: float) -> bool:
        sa = self._active(tunnel_id)
        if sa is None:
            return False
        sa.request("dpd", None)
        sa.pump(now)
        self._schedule(sa)
        return True

    def initiate(
        self,
        tunnel: TunnelAuth,
        *,
        local: Address,
        remote: Address,
        now: float,
        id_kind: str = "fqdn",
        ike_suites: list[IkeSuite] | None = None,
        child_suites: list[ChildSuite] | None = None,
        ke_group: int | None = None,
        initial_contact: bool = True,
        extra_payloads: dict[str, list[Payload]] | None = None,
    ) -> bytes:
        """Start an IKE SA as initiator with a PSK (tests and bench). Returns SPIi.

        ``local`` with port 4500 starts on 4500 (RFC 3948 non-ESP marker is the
        transport's job). ``ke_group`` lets a test send a KE the responder does
        not prefer (→ INVALID_KE_PAYLOAD and a retry); ``extra_payloads`` adds
        payloads to the ``"init"`` or ``"auth"`` request, to act like other
        vendors' initiators (strongSwan's notifies, CP, vendor IDs)."""
        suites = ike_suites or ALL_IKE_SUITES
        sa = IkeSa(self, initiator=True, spi_i=self.allocate_ike_spi(), spi_r=_ZERO_SPI, now=now)
        sa.tunnel = tunnel
        sa.local, sa.remote = local, remote
        sa.ni = self.rng(32)
        sa.kex = dhmod.generate(ke_group or suites[0].dh)
        sa.auth_ctx = {
            "id_kind": id_kind,
            "ike_suites": suites,
            "child_suites": child_suites or CHILD_SUITES_NO_PFS,
            "initial_contact": initial_contact,
            "extra": extra_payloads or {},
        }
        self.sas[sa.our_spi] = sa
        sa.send_init(now)
        self._schedule(sa)
        return sa.spi_i

    # ------------------------------------------------------------ persistence

    STATE_VERSION = 1

    def export_state(self) -> bytes:
        """Every established IKE SA (keys, Message IDs, Child SAs) as bytes.

        The control service seals this into its store so that a restarted
        control node continues the peers' IKE SAs (issue 7). It holds key
        material: store it encrypted only. Half-open SAs are not kept."""
        shift = self._last_now
        sas = [
            sa.to_state(shift)
            for sa in self.sas.values()
            if sa.tunnel is not None
            and sa.state in (IkeState.ESTABLISHED, IkeState.REKEYED, IkeState.DELETING)
        ]
        blob: bytes = msgpack.packb({"v": self.STATE_VERSION, "sas": sas}, use_bin_type=True)
        return blob

    def import_state(self, data: bytes, now: float) -> None:
        """Restore what :meth:`export_state` produced (times re-based on ``now``).

        Child SA records are not re-announced: the control service persisted and
        republished them. A blob that does not parse is ignored (counted)."""
        try:
            obj = msgpack.unpackb(data, raw=False)
            if not isinstance(obj, dict) or obj.get("v") != self.STATE_VERSION:
                raise ValueError("unknown IKE state version")
            restored = [IkeSa.from_state(self, d, now) for d in obj["sas"]]
            successors = [d.get("successor") for d in obj["sas"]]
        except Exception:
            self.drops["bad_state_blob"] += 1
            return
        for sa, succ in zip(restored, successors, strict=True):
            self.sas[sa.our_spi] = sa
            self._link_successor(sa, succ)
            if sa.tunnel is not None:
                self.by_tunnel.setdefault(sa.tunnel.tunnel_id, set()).add(sa.our_spi)
            for c in sa.children.values():
                self.spis_in_use.add(c.spi_in)
            offered = None if sa.pending is None else offered_spi(sa.pending)
            if offered is not None:  # the SPI a request in flight offered
                self.spis_in_use.add(offered)
            self._schedule(sa)
        self._last_now = max(self._last_now, now)

    def take_touched(self) -> set[bytes]:
        """Our SPIs of every IKE SA whose state may have changed since the last
        call: each one that got a message, ran a timer or was asked something,
        with the other IKE SAs of its tunnel (rekeys move Child SAs between
        them), and each one that went. The control service persists these after
        every flush instead of comparing every IKE SA; the other SAs cannot
        have changed. The first call starts the tracking (and returns nothing):
        an engine nobody asks keeps no set."""
        self._track_touched = True
        out, self._touched = self._touched, set()
        for tunnel_id in self._touched_tunnels:
            out |= self.by_tunnel.get(tunnel_id, set())
        self._touched_tunnels.clear()
        return out

    def _touch(self, sa: IkeSa) -> None:
        if not self._track_touched:
            return
        self._touched.add(sa.our_spi)
        if sa.tunnel is not None:
            self._touched_tunnels.add(sa.tunnel.tunnel_id)

    def _link_successor(self, sa: IkeSa, succ: Any) -> None:
        """Put back the link from a rekeyed IKE SA to the one its Child SAs
        moved to (§2.18), in whichever order their rows come: a late Child SA
        DELETE on the old IKE SA must still find them (``IkeSa.owner``)."""
        if isinstance(succ, bytes):
            target = self.sas.get(succ)
            if target is not None:
                sa.successor = target
            else:
                self._successor_of[succ] = sa
        older = self._successor_of.pop(sa.our_spi, None)
        if older is not None and older.successor is None:
            older.successor = sa

    # ------------------------------------------------------------ hooks for IkeSa

    @property
    def last_now(self) -> float:
        """The latest ``now`` the engine was given."""
        return self._last_now

    def send(self, data: bytes, local: Address, remote: Address) -> None:
        self._out.append((data, local, remote))

    def emit(self, event: IkeEvent) -> None:
        self._events.append(event)

    def count(self, trigger: str) -> None:
        self.drops[trigger] += 1

    def allocate_spi(self) -> int:
        """A fresh inbound ESP SPI (≥ 256, RFC 4303 §2.1), unique on this node."""
        while True:
            spi = int.from_bytes(self.rng(4), "big")
            if spi >= 256 and spi not in self.spis_in_use:
                self.spis_in_use.add(spi)
                return spi

    def release_spi(self, spi: int) -> None:
        self.spis_in_use.discard(spi)

    def allocate_ike_spi(self) -> bytes:
        while True:
            spi = self.rng(8)
            if spi != _ZERO_SPI and spi not in self.sas:
                return spi

    def new_child_id(self) -> int:
        return int.from_bytes(self.rng(6), "big")

    def register(self, sa: IkeSa) -> None:
        self.sas[sa.our_spi] = sa
        self._schedule(sa)

    def established(self, sa: IkeSa) -> None:
        self._leave_half_open(sa)
        if sa.tunnel is not None:
            self.by_tunnel.setdefault(sa.tunnel.tunnel_id, set()).add(sa.our_spi)

    def _leave_half_open(self, sa: IkeSa) -> None:
        if sa.init_key is not None and self.half_open.get(sa.init_key) is sa:
            del self.half_open[sa.init_key]
            ip = sa.init_key[1]
            self.half_open_per_ip[ip] -= 1
            if self.half_open_per_ip[ip] <= 0:
                del self.half_open_per_ip[ip]
        sa.init_key = None

    def discard(self, sa: IkeSa, reason: str) -> None:
        """Forget an IKE SA without events (its owner sent the ones due)."""
        self._touch(sa)
        # our Child SA request still unanswered on it continues where the Child
        # SAs moved (every way an IKE SA ends comes through here)
        sa._hand_over_pending()
        self._leave_half_open(sa)
        for c in sa.children.values():
            self.release_spi(c.spi_in)
        # SPIs reserved for Child SAs still being negotiated
        pending_ctx = sa.pending.ctx if sa.pending and sa.pending.kind != "delete_child" else {}
        for ctx in (pending_ctx, sa.auth_ctx):
            spi = ctx.get("spi_in", ctx.get("offered"))
            if isinstance(spi, int):
                self.release_spi(spi)
        for kind, arg in sa.queue:  # moved nowhere: the IKE SA and its work end here
            if kind == "delete_offered":
                self.release_spi(arg)
        sa.children = {}
        sa.state = IkeState.CLOSED
        sa.pending = None
        sa.queue.clear()
        if self.sas.get(sa.our_spi) is sa:
            del self.sas[sa.our_spi]
        if sa.tunnel is not None:
            spis = self.by_tunnel.get(sa.tunnel.tunnel_id)
            if spis is not None:
                spis.discard(sa.our_spi)
                if not spis:
                    del self.by_tunnel[sa.tunnel.tunnel_id]

    def initial_contact(self, sa: IkeSa, now: float) -> None:
        """§2.4 INITIAL_CONTACT: every other IKE SA of this tunnel is stale."""
        assert sa.tunnel is not None
        for spi in list(self.by_tunnel.get(sa.tunnel.tunnel_id, ())):
            other = self.sas.get(spi)
            if other is not None and other is not sa:
                other.close("initial_contact")

    def parse_identity(
        self, idp: IdPayload, local_addr: str, remote_addr: str
    ) -> PeerIdentity | None:
        """The seeds' ID forms (DESIGN §3) → PeerIdentity; None if none fits."""
        suffix = "." + self.config.id_suffix.lower()
        try:
            if idp.id_type == IdType.IPV4_ADDR:
                if len(idp.data) != 4:
                    return None
                addr = str(ipaddress.IPv4Address(idp.data))
                return PeerIdentity("ipv4", None, None, addr, local_addr, remote_addr)
            text = idp.data.decode("ascii").lower()
        except (UnicodeDecodeError, ValueError):
            return None
        kind = ""
        rest = ""
        if idp.id_type == IdType.RFC822_ADDR and text.startswith("ipsec@"):
            kind, rest = "rfc822", text[len("ipsec@") :]
        elif idp.id_type == IdType.FQDN:
            kind, rest = "fqdn", text
        elif idp.id_type == IdType.KEY_ID:
            account, sep, tunnel = idp.data.decode("ascii", "replace").rpartition("_")
            tunnel = tunnel.lower()
            if sep and _ACCOUNT.match(account) and _HEX32.match(tunnel):
                return PeerIdentity("key_id", account, tunnel, None, local_addr, remote_addr)
            return None
        if kind and rest.endswith(suffix):
            tunnel, dot, account = rest[: -len(suffix)].partition(".")
            # The account part keeps the case the peer sent (records are case-sensitive).
            raw = idp.data.decode("ascii")
            start = raw.lower().index(account, len(raw) - len(suffix) - len(account))
            account = raw[start : start + len(account)]
            if dot and _HEX32.match(tunnel) and _ACCOUNT.match(account):
                return PeerIdentity(kind, account, tunnel, None, local_addr, remote_addr)
        return None

    def make_identity(self, tunnel: TunnelAuth, kind: str, local_addr: str) -> IdPayload:
        """Our IDi as an initiator, in one of the seeds' forms."""
        t, a, sfx = tunnel.tunnel_id, tunnel.account_id, self.config.id_suffix
        if kind == "rfc822":
            return IdPayload(IdType.RFC822_ADDR, f"ipsec@{t}.{a}.{sfx}".encode())
        if kind == "key_id":
            return IdPayload(IdType.KEY_ID, f"{a}_{t}".encode())
        if kind == "ipv4":
            return IdPayload(IdType.IPV4_ADDR, ipaddress.IPv4Address(local_addr).packed)
        return IdPayload(IdType.FQDN, f"{t}.{a}.{sfx}".encode())

    # ------------------------------------------------------------ internals

    def _schedule(self, sa: IkeSa, after: float | None = None) -> None:
        """(Re)arm ``sa``'s deadline; ``after``: it just ran at that time, so a
        deadline not later than it was not moved (see :meth:`handle_timer`).
        Every path that changes an IKE SA comes through here (or :meth:`discard`)."""
        self._touch(sa)
        if sa.state is IkeState.CLOSED or self.sas.get(sa.our_spi) is not sa:
            return
        when = sa.next_deadline()
        if when is not None and after is not None and when <= after:
            self.drops["timer_stuck"] += 1
            when = after + STUCK_TIMER_RETRY
        if when is None or when == sa.scheduled:
            return
        sa.scheduled = when
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, sa.our_spi))

    def _receive(self, data: bytes, local: Address, remote: Address, now: float) -> IkeSa | None:
        if len(data) < wire.HEADER_LEN:
            raise Dropped("short")
        try:
            header = wire.decode_header(data)
        except wire.MessageError:
            raise Dropped("bad_length") from None
        if header.version >> 4 != 2:
            if (
                header.exchange == ExchangeType.IKE_SA_INIT
                and not header.is_response
                and header.version >> 4 > 2
            ):
                # §1.5 / §2.5: tell the peer the highest version we speak.
                self._reply_unprotected(header, Notify.INVALID_MAJOR_VERSION, b"", local, remote)
            raise Dropped("version")
        if header.exchange not in _EXCHANGES:
            raise Dropped("unknown_exchange")
        if (
            header.exchange == ExchangeType.IKE_SA_INIT
            and header.from_initiator
            and not header.is_response
        ):
            if header.spi_r != _ZERO_SPI or header.message_id != 0:
                raise Dropped("bad_init")
            return self._on_init_request(data, header, local, remote, now)
        our_spi = header.spi_r if header.from_initiator else header.spi_i
        sa = self.sas.get(our_spi)
        if sa is None:
            raise Dropped("unknown_spi")
        if sa.spi_i != header.spi_i or (
            sa.spi_r != header.spi_r and sa.state is not IkeState.INIT_SENT
        ):
            raise Dropped("unknown_spi")
        if header.from_initiator == sa.initiator:
            raise Dropped("bad_initiator_flag")  # our own role's message reflected back
        sa.receive(data, local, remote, now)
        return sa

    def _reply_unprotected(
        self,
        header: wire.Header,
        notify: int,
        data: bytes,
        local: Address,
        remote: Address,
    ) -> None:
        """An unencrypted IKE_SA_INIT error response (§2.21.1); keeps no state."""
        out = wire.encode(
            spi_i=header.spi_i,
            spi_r=_ZERO_SPI,
            exchange=ExchangeType.IKE_SA_INIT,
            flags=wire.FLAG_RESPONSE,
            message_id=0,
            payloads=[Payload(PayloadType.NOTIFY, NotifyPayload(notify, data))],
        )
        self.send(out, local, remote)

    def _cookie(self, ni: bytes, remote: Address, spi_i: bytes) -> bytes:
        """§2.6: <VersionIDofSecret> | Hash(Ni | IPi | SPIi | <secret>)."""
        ip = ipaddress.ip_address(remote[0]).packed
        digest = hashlib.sha256(ni + ip + spi_i + self._cookie_secret).digest()[:16]
        return bytes([self._cookie_version]) + digest

    def _on_init_request(
        self, data: bytes, header: wire.Header, local: Address, remote: Address, now: float
    ) -> IkeSa | None:
        """§1.2 messages 1 → 2, responder side; state is kept only on success."""
        # Keyed by the message's hash too: a different IKE_SA_INIT with the same SPIi
        # (a forged or corrupted copy seen first) must not lock the real one out.
        digest = request_hash(data)
        key = (header.spi_i, remote[0], remote[1], digest)
        existing = self.half_open.get(key)
        if existing is not None:
            # §2.1: retransmitted IKE_SA_INIT → same response, no new state.
            self.count("retransmit_answered")
            self.send(existing.init_response, local, remote)
            return None
        cfg = self.config
        if len(self.half_open) >= cfg.max_half_open:
            raise Dropped("half_open_limit")
        if self.half_open_per_ip[remote[0]] >= cfg.max_half_open_per_peer:
            raise Dropped("half_open_peer_limit")
        try:
            msg = wire.decode(data)
        except wire.MessageError:
            raise Dropped("malformed") from None
        if msg.sk_offset is not None:
            raise Dropped("malformed")
        if msg.unknown_critical is not None:
            self._reply_unprotected(
                header,
                Notify.UNSUPPORTED_CRITICAL_PAYLOAD,
                bytes([msg.unknown_critical & 0xFF]),
                local,
                remote,
            )
            raise Dropped("unsupported_critical")
        sa_p, ke, nonce = (
            msg.get(PayloadType.SA),
            msg.get(PayloadType.KE),
            msg.get(PayloadType.NONCE),
        )
        if not (
            isinstance(sa_p, SaPayload)
            and isinstance(ke, KePayload)
            and isinstance(nonce, NoncePayload)
        ):
            self._reply_unprotected(header, Notify.INVALID_SYNTAX, b"", local, remote)
            raise Dropped("init_missing_payloads")
        # §2.6: above the threshold, demand a cookie before spending a DH on it.
        if len(self.half_open) >= cfg.cookie_threshold:
            first = msg.payloads[0].body if msg.payloads else None
            want = self._cookie(nonce.nonce, remote, header.spi_i)
            if not (
                isinstance(first, NotifyPayload)
                and first.type == Notify.COOKIE
                and first.data == want
            ):
                self._reply_unprotected(header, Notify.COOKIE, want, local, remote)
                raise Dropped("cookie_sent")
        try:
            _, suite = select_ike(sa_p)
        except NoProposalChosen:
            self._reply_unprotected(header, Notify.NO_PROPOSAL_CHOSEN, b"", local, remote)
            self.emit(NegotiationFailed(remote, None, "NO_PROPOSAL_CHOSEN", True))
            raise Dropped("no_proposal_chosen") from None
        if ke.group != suite.dh:
            # §1.2/§3.10.1: INVALID_KE_PAYLOAD carries the group we want.
            groups = ike_groups_offered(sa_p)
            want_group = suite.dh if suite.dh in groups else groups[0]
            self._reply_unprotected(
                header, Notify.INVALID_KE_PAYLOAD, want_group.to_bytes(2, "big"), local, remote
            )
            self.emit(NegotiationFailed(remote, None, "INVALID_KE_PAYLOAD", True))
            raise Dropped("invalid_ke")
        kex = dhmod.generate(suite.dh)
        try:
            g_ir = kex.shared(ke.data)
        except dhmod.DhError:
            raise Dropped("bad_ke") from None
        spi_r = self.allocate_ike_spi()
        sa = IkeSa(self, initiator=False, spi_i=header.spi_i, spi_r=spi_r, now=now)
        sa.local, sa.remote = local, remote
        sa.ni = nonce.nonce
        sa.nr = self.rng(32)
        sa.derive_initial_keys(suite, g_ir)
        out: list[Payload] = [
            Payload(PayloadType.SA, ike_sa_payload(suite, _chosen_num(sa_p, suite))),
            Payload(PayloadType.KE, KePayload(suite.dh, kex.public)),
            Payload(PayloadType.NONCE, NoncePayload(sa.nr)),
        ]
        # §2.23 NAT detection: hashes over what each side sees.
        src = [n.data for n in msg.notifies() if n.type == Notify.NAT_DETECTION_SOURCE_IP]
        dst = [n.data for n in msg.notifies() if n.type == Notify.NAT_DETECTION_DESTINATION_IP]
        if src or dst:
            peer_ok = nat_hash(sa.spi_i, _ZERO_SPI, remote) in src
            we_ok = nat_hash(sa.spi_i, _ZERO_SPI, local) in dst
            sa.nat_detected = not (peer_ok and we_ok)
            out.append(
                Payload(
                    PayloadType.NOTIFY,
                    NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, nat_hash(sa.spi_i, spi_r, local)),
                )
            )
            out.append(
                Payload(
                    PayloadType.NOTIFY,
                    NotifyPayload(
                        Notify.NAT_DETECTION_DESTINATION_IP, nat_hash(sa.spi_i, spi_r, remote)
                    ),
                )
            )
        # RFC 3948 / seeds: started on 4500 → ESP in UDP even without NAT.
        sa.udp_encap = sa.nat_detected or local[1] == 4500
        response = wire.encode(
            spi_i=sa.spi_i,
            spi_r=spi_r,
            exchange=ExchangeType.IKE_SA_INIT,
            flags=wire.FLAG_RESPONSE,
            message_id=0,
            payloads=out,
        )
        sa.init_request = data
        sa.init_response = response
        sa.peer_next = 1
        sa.last_response = response
        sa.last_request = (digest, local, remote)
        sa.init_key = key
        self.half_open[key] = sa
        self.half_open_per_ip[remote[0]] += 1
        self.sas[spi_r] = sa
        self.send(response, local, remote)
        return sa


_EXCHANGES = frozenset(int(e) for e in ExchangeType)


def _chosen_num(sa: SaPayload, suite: IkeSuite) -> int:
    """The peer's number of the proposal :func:`select_ike` picked (§3.3.1)."""
    proposal, _ = select_ike(sa)
    return proposal.num


__all__ = [
    "Address",
    "Any",
    "IkeConfig",
    "IkeEngine",
    "Lookup",
    "PeerIdentity",
    "TunnelAuth",
]
