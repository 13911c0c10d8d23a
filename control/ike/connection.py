"""One IKE SA and its Child SAs, in either role — sans-IO.

The engine routes a datagram here by our SPI; this class checks Message IDs
(§2.3, window size 1), re-sends the cached response to a retransmitted request
(only a bitwise-identical one, §2.1),
opens the SK payload, rejects what :mod:`control.ike.state` does not allow, and
runs the handler. Our own requests (DPD, rekeys, deletes) go one at a time
from a queue and are retransmitted with backoff until given up (§2.4).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import TYPE_CHECKING, Any

from control.ike import dh as dhmod
from control.ike import messages as wire
from control.ike.crypto import (
    ChildKeys,
    CryptoError,
    IkeKeys,
    Prf,
    SkCipher,
    child_keymat,
    derive_ike_keys,
    psk_auth,
    rekey_skeyseed,
    signed_octets,
    skeyseed,
)
from control.ike.events import (
    AuthenticationFailed,
    ChildSaDeleted,
    ChildSaInstalled,
    ChildSaUpdated,
    IkeSaDeleted,
    IkeSaEstablished,
    IkeSaRekeyed,
    NegotiationFailed,
)
from control.ike.payloads import (
    AuthMethod,
    AuthPayload,
    DeletePayload,
    ExchangeType,
    IdPayload,
    IdType,
    KePayload,
    NoncePayload,
    Notify,
    NotifyPayload,
    Payload,
    PayloadType,
    Proposal,
    Protocol,
    SaPayload,
    Selector,
    TransformType,
    TsPayload,
    TsType,
    notify_name,
)
from control.ike.proposals import (
    ChildSuite,
    IkeSuite,
    NoProposalChosen,
    child_offer,
    child_sa_payload,
    ike_offer,
    ike_sa_payload,
    select_child,
    select_ike,
)
from control.ike.state import (
    REQUESTS,
    RESPONSES,
    AuthenticationFailedError,
    ChildSaNotFound,
    Dropped,
    IkeError,
    IkeState,
    InvalidKePayload,
    InvalidSyntax,
    NoAdditionalSas,
    NoProposalChosenError,
    TemporaryFailure,
    TsUnacceptable,
    UnsupportedCriticalPayload,
)
from replication.records import Direction, SaRecord, TrafficSelector

if TYPE_CHECKING:
    from control.ike.engine import IkeEngine, TunnelAuth

Address = tuple[str, int]
NONCE_LEN = 32


def nat_hash(spi_i: bytes, spi_r: bytes, addr: Address) -> bytes:
    """§2.23: SHA-1(SPIi | SPIr | IP | Port)."""
    ip = ipaddress.ip_address(addr[0]).packed
    return hashlib.sha1(spi_i + spi_r + ip + addr[1].to_bytes(2, "big")).digest()


def request_hash(data: bytes) -> bytes:
    """§2.1: what identifies a retransmission — a hash of the whole datagram."""
    return hashlib.sha256(data).digest()[:16]


def id_text(p: IdPayload) -> str:
    """The identity as text, for events and logs (not secret)."""
    try:
        if p.id_type == IdType.IPV4_ADDR and len(p.data) == 4:
            return str(ipaddress.IPv4Address(p.data))
        if p.id_type == IdType.IPV6_ADDR and len(p.data) == 16:
            return str(ipaddress.IPv6Address(p.data))
        return p.data.decode("utf-8", "replace")[:255]
    except ValueError:
        return p.data.hex()[:255]


# --------------------------------------------------------------- selectors


def _to_selector(ts: TrafficSelector) -> Selector:
    a, b = ipaddress.ip_address(ts.start), ipaddress.ip_address(ts.end)
    tt = TsType.IPV4_ADDR_RANGE if a.version == 4 else TsType.IPV6_ADDR_RANGE
    return Selector(tt, ts.protocol, ts.start_port, ts.end_port, a, b)


def _to_record(s: Selector) -> TrafficSelector:
    return TrafficSelector(str(s.start), str(s.end), s.protocol, s.start_port, s.end_port)


def narrow(offered: list[Selector], allowed: tuple[TrafficSelector, ...]) -> list[Selector]:
    """§2.9: the intersection of what the peer proposes with what the tunnel allows."""
    out: list[Selector] = []
    for o in offered:
        for t in allowed:
            a = _to_selector(t)
            if a.ts_type != o.ts_type:
                continue
            lo = max(int(o.start), int(a.start))
            hi = min(int(o.end), int(a.end))
            if lo > hi:
                continue
            start = (
                ipaddress.ip_address(lo)
                if o.ts_type == TsType.IPV4_ADDR_RANGE
                else (ipaddress.IPv6Address(lo))
            )
            end = (
                ipaddress.ip_address(hi)
                if o.ts_type == TsType.IPV4_ADDR_RANGE
                else (ipaddress.IPv6Address(hi))
            )
            if o.protocol and a.protocol and o.protocol != a.protocol:
                continue
            proto = o.protocol or a.protocol
            sp, ep = max(o.start_port, a.start_port), min(o.end_port, a.end_port)
            if sp > ep:
                continue
            s = Selector(o.ts_type, proto, sp, ep, start, end)
            if s not in out:
                out.append(s)
    return out


CHILD_WORK = frozenset({"rekey_child", "delete_child", "new_child", "delete_offered"})
"""Queued requests about Child SAs (they move with the Child SAs, ``_hand_to``)."""

# --------------------------------------------------------------- Child SA


@dataclass(slots=True)
class ChildSa:
    spi_in: int
    """Our SPI: the peer sends ESP to it."""
    spi_out: int
    suite: ChildSuite
    keys_in: tuple[bytes, bytes]
    """(encryption key incl. GCM salt, integrity key) for inbound ESP."""
    keys_out: tuple[bytes, bytes]
    ts_local: tuple[TrafficSelector, ...]
    ts_remote: tuple[TrafficSelector, ...]
    child_id: int
    generation: int
    created: float
    rekey_at: float
    expire_at: float
    pfs_hint: int | None = None
    """PFS group to offer when we rekey (the peer's proposal listed it)."""
    replaces: tuple[int, int] | None = None
    rekeyed: bool = False
    """Superseded by a newer Child SA; only waits for its DELETE."""
    delete_at: float | None = None
    """Make-before-break fallback: when we send DELETE for this superseded SA
    even if its replacement was never confirmed on every worker."""
    deleting: bool = False
    rekeying: bool = False
    """A rekey we started for it is in flight (on this or an older IKE SA)."""
    unconfirmed_successor: int | None = None
    """Our SPI of the Child SA that replaced this one in a rekey the PEER started:
    we cannot know our response arrived until the peer deletes this one."""
    outbound_held: bool = False
    """Created by our answer to a rekey the PEER started: its outbound record is
    not published until the peer deletes the old Child SA
    (:meth:`IkeSa._release_outbound`). Until then the peer may not have
    installed its inbound SA (our answer may still be on its way), and a worker
    switching to the new SPI at once loses packets; the peer keeps the old
    inbound SA until it deletes it. strongSwan does the same as a rekey
    responder (``child_rekey.c``: the outbound SA is installed once the old SA
    is deleted)."""
    records: tuple[SaRecord, SaRecord] | None = None
    replaced_by: int | None = None
    """Make-before-break for a rekey WE started: our SPI of the replacing Child
    SA. This one is deleted with the peer once that one is on every worker
    (``IkeEngine.child_sa_ready``), or at ``delete_at`` at the latest."""
    answered: tuple[bytes, int, float] | None = None
    """Created by our ANSWER to the peer's request: (our SPI of the IKE SA it
    came on, that request's Message ID, when). Until the peer shows it got the
    answer — any later request on that IKE SA (§2.3, window 1) — it may still be
    waiting for it (lost, being retransmitted, §2.1): a rekey of it would meet
    CHILD_SA_NOT_FOUND, so ours waits (``IkeConfig.peer_answer_grace`` at most)."""
    deferred_delete: tuple[str, float] | None = None
    """(reason, when to try again): our DELETE of a Child SA the peer may not
    hold yet (``answered``) waits, or the peer would ignore it (§3.11) and then
    install the Child SA from our retransmitted answer — an orphan."""

    def __repr__(self) -> str:
        return f"ChildSa(in=0x{self.spi_in:08x}, out=0x{self.spi_out:08x}, {self.suite.name})"


@dataclass(slots=True)
class OutRequest:
    """Our request in flight: its bytes are built once and re-sent as they are."""

    kind: str
    exchange: int
    message_id: int
    data: bytes
    sent_at: float
    next_retransmit: float
    tries: int = 0
    ctx: dict[str, Any] = field(default_factory=dict)


def offered_spi(req: OutRequest) -> int | None:
    """The ESP SPI a CREATE_CHILD_SA request of ours offered (ours for the new
    Child SA), also once restored as an ``orphan``; None for anything else."""
    if req.exchange != ExchangeType.CREATE_CHILD_SA or req.kind == "rekey_ike":
        return None
    spi = req.ctx.get("spi_in", req.ctx.get("offered"))
    return spi if isinstance(spi, int) else None


def _kex_state(kex: dhmod.KeyExchange | None) -> list[Any] | None:
    if kex is None:
        return None
    x = kex.private_value()
    return [kex.group, x.to_bytes((x.bit_length() + 7) // 8 or 1, "big"), kex.public]


def _pending_ctx(req: OutRequest) -> dict[str, Any] | None:
    """What a restarted engine needs to finish our CREATE_CHILD_SA in flight
    (a Child SA, or an IKE SA rekey outside a §2.8.2 collision) when the
    peer's answer comes: our nonce, our ephemeral DH key — sealed in the store
    like SK_d — and the SPI we offered. Without it the answer could not be
    used, and the peer alone would hold what it made of the request."""
    ctx = req.ctx
    if req.kind in ("rekey_child", "new_child"):
        col = ctx.get("collision")
        return {
            "ni": ctx["ni"],
            "spi_in": ctx["spi_in"],
            "kex": _kex_state(ctx["kex"]),
            "old": ctx["old"],
            "suites": [[s.encr, s.key_bits, s.integ, s.dh] for s in ctx["suites"]],
            "group": ctx["group"],
            "attempt": ctx.get("attempt", 0),
            "collision": None if col is None else list(col),
        }
    if req.kind == "rekey_ike" and "collision" not in ctx:
        su = ctx["suite"]
        return {
            "ni": ctx["ni"],
            "spi": ctx["spi"],
            "kex": _kex_state(ctx["kex"]),
            "suite": [su.encr, su.key_bits, su.integ, su.prf, su.dh],
        }
    return None


def _restore_ctx(kind: str, d: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_pending_ctx`."""
    k = d["kex"]
    kex = None if k is None else dhmod.restore(k[0], int.from_bytes(k[1], "big"), k[2])
    if kind == "rekey_ike":
        return {"ni": d["ni"], "spi": d["spi"], "kex": kex, "suite": IkeSuite(*d["suite"])}
    col = d["collision"]
    return {
        "ni": d["ni"],
        "spi_in": d["spi_in"],
        "kex": kex,
        "old": d["old"],
        "suites": [ChildSuite(*x) for x in d["suites"]],
        "group": d["group"],
        "attempt": d["attempt"],
        **({} if col is None else {"collision": tuple(col)}),
    }


# ----------------------------------------------------------------- IKE SA


class IkeSa:
    """One IKE SA. ``initiator`` is the ORIGINAL initiator role (§2.2, the I flag)."""

    __slots__ = (
        "auth_ctx",
        "children",
        "created",
        "engine",
        "half_open_deadline",
        "id_kind",
        "ike_rekey_at",
        "init_key",
        "init_request",
        "init_response",
        "initiator",
        "iv_counter",
        "kex",
        "keys",
        "last_heard",
        "last_request",
        "last_response",
        "linger_until",
        "local",
        "nat_detected",
        "ni",
        "nr",
        "our_next",
        "peer_next",
        "pending",
        "prf",
        "queue",
        "remote",
        "restored",
        "retire",
        "scheduled",
        "sk_in",
        "sk_out",
        "spi_i",
        "spi_r",
        "state",
        "successor",
        "suite",
        "tunnel",
        "udp_encap",
    )

    def __init__(
        self, engine: IkeEngine, *, initiator: bool, spi_i: bytes, spi_r: bytes, now: float
    ) -> None:
        self.engine = engine
        self.initiator = initiator
        self.spi_i = spi_i
        self.spi_r = spi_r
        self.state = IkeState.INIT_SENT if initiator else IkeState.HALF_OPEN
        self.created = now
        self.local: Address = ("0.0.0.0", 500)
        self.remote: Address = ("0.0.0.0", 500)
        self.nat_detected = False
        self.udp_encap = False
        self.tunnel: TunnelAuth | None = None
        self.id_kind = ""
        self.suite: IkeSuite | None = None
        self.prf: Prf | None = None
        self.keys: IkeKeys | None = None
        self.sk_in: SkCipher | None = None
        self.sk_out: SkCipher | None = None
        self.children: dict[int, ChildSa] = {}
        # handshake material, dropped once established
        self.ni = b""
        self.nr = b""
        self.init_request = b""
        self.init_response = b""
        self.kex: dhmod.KeyExchange | None = None
        self.auth_ctx: dict[str, Any] = {}
        # message IDs, §2.3 (window 1)
        self.peer_next = 0
        self.last_response: bytes = b""
        self.last_request: tuple[bytes, Address, Address] | None = None
        """(hash of the whole datagram, local, remote) of the request that
        ``last_response`` answers: only a bitwise copy of it is a retransmission."""
        self.our_next = 0
        self.pending: OutRequest | None = None
        self.queue: deque[tuple[str, Any]] = deque()
        self.iv_counter = 0
        # timers
        self.last_heard = now
        self.half_open_deadline = now + engine.config.half_open_timeout
        self.ike_rekey_at = 0.0
        self.linger_until = 0.0
        self.retire = False
        self.restored = False
        """Came back from :meth:`from_state`, and neither a timer run nor a
        message from the peer since: the first timer run places its first DPD
        (:meth:`_spread_restored_dpd`)."""
        self.scheduled: float | None = None
        self.init_key: tuple[bytes, str, int, bytes] | None = None
        self.successor: IkeSa | None = None
        """After an IKE SA rekey (§2.18): the IKE SA that now owns the Child SAs."""

    # ------------------------------------------------------------- helpers

    @property
    def our_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    def __repr__(self) -> str:
        return f"IkeSa({self.spi_i.hex()}/{self.spi_r.hex()}, {self.state.value})"

    def _flags(self, response: bool) -> int:
        f = wire.FLAG_INITIATOR if self.initiator else 0
        return f | (wire.FLAG_RESPONSE if response else 0)

    def _iv(self) -> bytes:
        """Unique per message under one key (RFC 5282 §3.1: a counter is fine)."""
        assert self.sk_out is not None
        self.iv_counter += 1
        if self.sk_out.gcm:
            return self.iv_counter.to_bytes(8, "big")
        return self.engine.rng(16)

    def _encode(
        self, exchange: int, message_id: int, payloads: list[Payload], response: bool
    ) -> bytes:
        return wire.encode(
            spi_i=self.spi_i,
            spi_r=self.spi_r,
            exchange=exchange,
            flags=self._flags(response),
            message_id=message_id,
            payloads=payloads,
            cipher=self.sk_out,
            iv=self._iv() if self.sk_out is not None else b"",
        )

    def _send(self, data: bytes) -> None:
        self.engine.send(data, self.local, self.remote)

    def _emit(self, event: Any) -> None:
        self.engine.emit(event)

    @property
    def tunnel_id(self) -> str | None:
        return self.tunnel.tunnel_id if self.tunnel else None

    def _unix(self, t: float) -> float:
        return max(0.0, t + self.engine.config.unix_time_offset) if t else 0.0

    def _jittered(self, lifetime: float) -> float:
        cfg = self.engine.config
        r = int.from_bytes(self.engine.rng(2), "big") / 65535.0
        return lifetime * (1.0 - cfg.rekey_jitter * r)

    def derive_initial_keys(self, suite: IkeSuite, g_ir: bytes) -> None:
        """SKEYSEED = prf(Ni | Nr, g^ir) and SK_* from it (RFC 7296 §2.14), for
        the IKE SA that IKE_SA_INIT created; both roles, once ni/nr and both
        SPIs are known."""
        prf = Prf(suite.prf)
        keys = derive_ike_keys(
            prf,
            skeyseed(prf, self.ni, self.nr, g_ir),
            self.ni,
            self.nr,
            self.spi_i,
            self.spi_r,
            enc_len=suite.enc_key_len,
            integ_len=suite.integ_key_len,
        )
        self.set_keys(suite, keys)

    def set_keys(self, suite: IkeSuite, keys: IkeKeys) -> None:
        self.suite = suite
        self.prf = Prf(suite.prf)
        self.keys = keys
        integ = suite.integ
        if self.initiator:
            self.sk_out = SkCipher(suite.encr, keys.sk_ei, integ, keys.sk_ai)
            self.sk_in = SkCipher(suite.encr, keys.sk_er, integ, keys.sk_ar)
        else:
            self.sk_out = SkCipher(suite.encr, keys.sk_er, integ, keys.sk_ar)
            self.sk_in = SkCipher(suite.encr, keys.sk_ei, integ, keys.sk_ai)

    # ------------------------------------------------------------- receive

    def receive(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        header = wire.decode_header(data)
        if header.is_response:
            self._receive_response(data, header, local, remote, now)
        else:
            self._receive_request(data, header, local, remote, now)

    def _open(self, data: bytes) -> wire.Message:
        try:
            msg = wire.decode(data)
        except wire.MessageError:
            raise Dropped("malformed") from None
        if msg.header.exchange != ExchangeType.IKE_SA_INIT:
            if msg.sk_offset is None or self.sk_in is None:
                raise Dropped("not_encrypted")
            try:
                wire.open_sk(msg, self.sk_in)
            except CryptoError:
                raise Dropped("bad_icv") from None
            except wire.MessageError:
                # integrity verified, so the peer really sent garbage: INVALID_SYNTAX
                msg.payloads.clear()
                msg.unknown_critical = -1
        return msg

    def _note_address(self, local: Address, remote: Address) -> None:
        """§2.23: with NAT, follow the address of the latest authenticated message;
        moving to 4500 (the float) turns UDP encapsulation on."""
        if (local, remote) == (self.local, self.remote):
            return
        if self.state not in (IkeState.HALF_OPEN, IkeState.AUTH_SENT, IkeState.INIT_SENT) and (
            not self.nat_detected and local[1] != 4500
        ):
            return
        self.local, self.remote = local, remote
        if local[1] == 4500 and not self.udp_encap:
            self.udp_encap = True
        if self.state is IkeState.ESTABLISHED:
            for child in self.children.values():
                self._publish(child, updated=True)

    def _receive_request(
        self, data: bytes, header: wire.Header, local: Address, remote: Address, now: float
    ) -> None:
        if header.message_id == self.peer_next - 1 and self.last_response:
            self._answer_retransmission(data, local, remote)
            return
        if header.message_id != self.peer_next:
            raise Dropped("message_id")
        msg = self._open(data)
        self.last_heard = now
        self.restored = False  # heard for real: the normal DPD schedule
        self._confirm_answers(header.message_id)
        self._note_address(local, remote)
        handler = REQUESTS.get((self.state, ExchangeType(header.exchange)))
        if handler is None:
            raise Dropped("unexpected_exchange")
        response: list[Payload]
        after: Callable[[], None] | None = None
        try:
            if msg.unknown_critical == -1:
                raise InvalidSyntax("inner payloads do not parse")
            if msg.unknown_critical is not None:
                # §2.5: data is the unknown critical payload's type (1 octet)
                raise UnsupportedCriticalPayload(data=bytes([msg.unknown_critical & 0xFF]))
            response, after = getattr(self, handler)(msg, now)
        except IkeError as exc:
            response = [Payload(PayloadType.NOTIFY, NotifyPayload(exc.notify, exc.data))]
            after = self._after_error(exc, handler)
        out = self._encode(header.exchange, header.message_id, response, response=True)
        self.peer_next += 1
        self.last_response = out
        self.last_request = (request_hash(data), local, remote)
        self._send(out)
        if after is not None:
            after()

    def _confirm_answers(self, message_id: int) -> None:
        """§2.3: with a window of 1 the peer sends request N+1 only after our
        answer to N arrived, so the Child SAs our earlier answers created on this
        IKE SA are now known to the peer (``ChildSa.answered``)."""
        spi = self.our_spi
        for c in self.owner().children.values():
            a = c.answered
            if a is not None and a[0] == spi and a[1] < message_id:
                c.answered = None

    def _answer_retransmission(self, data: bytes, local: Address, remote: Address) -> None:
        """§2.1: a retransmitted request gets the cached response again — but only
        a true retransmission, bitwise identical to the request that produced it
        (§2.1: "A retransmission from the initiator MUST be bitwise identical to the
        original request").
        Anyone can forge our SPIs and an old Message ID around a garbage body
        (nothing here is authenticated), so answering anything else would make us
        a reflector towards whatever source address the forger wrote in.

        §2.23: from a new address or port (a NAT rebinding) an identical copy is
        answered only when NAT is in play for this IKE SA (detected, or UDP
        encapsulation on 4500); without NAT the peer does not move, and a copy
        from elsewhere is a replay aimed at a third party. The reply goes where
        the copy came from, as §2.23 asks for the peer's latest address."""
        last = self.last_request
        if last is None or not compare_digest(last[0], request_hash(data)):
            raise Dropped("retransmit_mismatch")
        if (local, remote) != (last[1], last[2]):
            if not (self.nat_detected or self.udp_encap or local[1] == 4500):
                raise Dropped("retransmit_moved")
            self.engine.count("retransmit_answered_moved")
        self.engine.count("retransmit_answered")
        self.engine.send(self.last_response, local, remote)

    def _after_error(self, exc: IkeError, handler: str) -> Callable[[], None] | None:
        if not isinstance(exc, AuthenticationFailedError):
            self._emit(NegotiationFailed(self.remote, self.tunnel_id, exc.notify.name, sent=True))
        if handler == "on_ike_auth" and isinstance(exc, AuthenticationFailedError | InvalidSyntax):
            # §2.21.2: no IKE SA after a failed IKE_AUTH; nothing kept.
            return lambda: self.engine.discard(self, "auth_failed")
        return None

    def _receive_response(
        self, data: bytes, header: wire.Header, local: Address, remote: Address, now: float
    ) -> None:
        req = self.pending
        if req is None or header.message_id != req.message_id or header.exchange != req.exchange:
            raise Dropped("unexpected_response")
        msg = self._open(data)
        self.last_heard = now
        self.restored = False  # heard for real: the normal DPD schedule
        self.pending = None
        handler = RESPONSES.get((self.state, ExchangeType(header.exchange)))
        if handler is None:
            raise Dropped("unexpected_response")
        if req.exchange != ExchangeType.IKE_SA_INIT:
            self._note_address(local, remote)
        getattr(self, handler)(msg, req, now)
        self.pump(now)

    # ------------------------------------------------------------- requests out

    def request(self, kind: str, arg: Any = None) -> None:
        self.queue.append((kind, arg))

    def pump(self, now: float) -> None:
        """Send the next queued request if none is outstanding (window size 1)."""
        while self.pending is None and self.queue and self.state is not IkeState.CLOSED:
            if self.state is not IkeState.ESTABLISHED and self.queue[0][0] in CHILD_WORK:
                # Child SA work belongs on the IKE SA that owns the Child SAs: it
                # waits here for _hand_to (a §2.8.2 collision still undecided)
                if all(k in CHILD_WORK for k, _ in self.queue):
                    return
                self.queue.rotate(-1)
                continue
            kind, arg = self.queue.popleft()
            built = getattr(self, "build_" + kind)(arg, now)
            if built is None:
                continue
            exchange, payloads, ctx = built
            mid = self.our_next
            self.our_next += 1
            data = self._encode(exchange, mid, payloads, response=False)
            self._start(kind, exchange, mid, data, now, ctx)

    def _start(
        self, kind: str, exchange: int, mid: int, data: bytes, now: float, ctx: dict[str, Any]
    ) -> None:
        cfg = self.engine.config
        self.pending = OutRequest(
            kind, exchange, mid, data, now, now + cfg.retransmit_timeout, 0, ctx
        )
        self._send(data)

    def next_deadline(self) -> float | None:
        cands: list[float] = []
        if self.pending is not None:
            cands.append(self.pending.next_retransmit)
        if self.state is IkeState.HALF_OPEN:
            cands.append(self.half_open_deadline)
        elif self.state is IkeState.ESTABLISHED:
            if self.pending is None and not self.queue:
                cands.append(self.last_heard + self.engine.config.dpd_interval)
            if self.restored:
                # due at once: the first timer run after the restore is what
                # knows the real restore instant to spread the first DPD over
                cands.append(self.last_heard)
            if self.ike_rekey_at:
                cands.append(self.ike_rekey_at)
            for c in self.children.values():
                if c.deleting:
                    if c.deferred_delete is not None:
                        cands.append(c.deferred_delete[1])
                    continue
                if c.rekeyed:
                    if c.delete_at is not None:
                        cands.append(c.delete_at)
                    cands.append(c.expire_at)
                else:
                    cands.append(c.rekey_at)
                    cands.append(c.expire_at)
        elif self.state is IkeState.REKEYED and self.linger_until:
            cands.append(self.linger_until)
        return min(cands) if cands else None

    def on_timer(self, now: float) -> None:
        cfg = self.engine.config
        req = self.pending
        if req is not None and now >= req.next_retransmit:
            if req.tries >= cfg.retransmit_tries:
                # §2.4: no answer after several retransmissions → the peer is gone.
                self.engine.count("gave_up")
                self.close("dpd" if req.kind == "dpd" else "timeout")
                return
            req.tries += 1
            req.next_retransmit = now + cfg.retransmit_timeout * cfg.retransmit_base**req.tries
            self.engine.count("retransmitted")
            self._send(req.data)
        if self.state is IkeState.HALF_OPEN and now >= self.half_open_deadline:
            self.engine.count("half_open_timeout")
            self.engine.discard(self, "half_open_timeout")
            return
        if self.state is IkeState.REKEYED and self.linger_until and now >= self.linger_until:
            self.linger_until = 0.0
            if self.retire:
                # §2.18: we rekeyed, so we delete the old IKE SA — after a grace
                # period in which the peer's exchanges on it could finish.
                self.retire = False
                self.request("delete_ike", None)
                self.pump(now)
            elif self.children:
                # only after a §2.8.2 collision whose deciding answer never came:
                # the Child SAs it kept die with it, with events
                self.close("peer_delete")
            else:
                self.engine.discard(self, "rekeyed")
            return
        if self.state is not IkeState.ESTABLISHED:
            return
        if self.restored:
            self.restored = False
            self._spread_restored_dpd(now)
        busy = self.pending is not None or bool(self.queue)
        # Every due deadline moves forward here, queued or not, so get_timer()
        # never returns a past time that handle_timer() would not act on.
        for c in list(self.children.values()):
            if c.deleting:
                if c.deferred_delete is not None and now >= c.deferred_delete[1]:
                    reason, c.deferred_delete = c.deferred_delete[0], None
                    self.request("delete_child", (c.spi_in, reason))
                continue
            if now >= c.expire_at:
                # a peer that never deleted the SA its rekey replaced: the new
                # outbound SA goes out now, not after our DELETE is answered
                self._release_outbound(c)
                self._queue_child_delete(c, "expired")
            elif c.rekeyed and c.delete_at is not None and now >= c.delete_at:
                c.delete_at = None
                if c.replaced_by is not None:
                    # never confirmed on every worker: a stuck worker must not
                    # keep old SAs alive forever (IkeConfig.rekey_delete_delay)
                    c.replaced_by = None
                    self.engine.count("make_before_break_timeout")
                self._queue_child_delete(c, "rekeyed")
            elif not c.rekeyed and now >= c.rekey_at:
                c.rekey_at = now + 30.0 + self._jittered(60.0)  # retry if this one fails
                if not self._queued("rekey_child", c.spi_in):
                    self.request("rekey_child", c.spi_in)
        if self.ike_rekey_at and now >= self.ike_rekey_at:
            # retry later if this attempt fails; jittered so two peers that both
            # answered TEMPORARY_FAILURE do not collide again
            self.ike_rekey_at = now + 30.0 + self._jittered(60.0)
            if not self._queued("rekey_ike", None):
                self.request("rekey_ike", None)
        if not busy and not self.queue and now >= self.last_heard + cfg.dpd_interval:
            self.request("dpd", None)
        self.pump(now)

    def _spread_restored_dpd(self, now: float) -> None:
        """Place the first DPD (§2.4) of an IKE SA restored after a control
        restart, at its first timer run (``now``): the first time the core
        sees the clock after the restore. :meth:`from_state` only gets the
        time the SA's row was written (the control service re-bases each row
        on it), or the restore instant for a blob or a row without that time.

        Left as restored, thousands of IKE SAs re-based on one instant would
        all send their DPD (then its retransmissions) together one interval
        later, and after a downtime longer than the interval every SA would be
        overdue and send at this run. Instead each is due at ``now +
        dpd_interval - phase``, the phase in [0, dpd_interval) hashed from its
        SPIs (deterministic: no ``random`` in the core, tests reproduce it),
        or at its own restored schedule if that is earlier. So the first DPDs
        spread over one interval, none later than one interval after this run,
        and rows whose write times are spread already are not pulled into a
        burst here: their DPD can only come earlier."""
        interval = self.engine.config.dpd_interval
        digest = hashlib.sha256(b"dpd phase" + self.spi_i + self.spi_r).digest()
        phase = interval * ((int.from_bytes(digest[:8], "big") >> 11) / 2.0**53)
        spread = now - phase
        if self.last_heard + interval > now:
            spread = min(spread, self.last_heard)
        self.last_heard = spread

    def owner(self) -> IkeSa:
        """The IKE SA that owns this one's Child SAs now: itself, or the newest
        successor after rekeys — late responses and deletes on an old IKE SA
        must act on the Child SAs where they moved."""
        sa = self
        for _ in range(8):
            if sa.successor is None:
                break
            sa = sa.successor
        return sa

    def _queued(self, kind: str, spi: int | None) -> bool:
        for k, arg in self.queue:
            if k != kind:
                continue
            if spi is None or arg == spi or (isinstance(arg, tuple) and arg[0] == spi):
                return True
        return False

    def child_ready(self, spi_in: int, now: float) -> bool:
        """The Child SA with our SPI ``spi_in`` is on every worker: delete the
        one it replaced in a rekey we started (make-before-break, DESIGN §3)."""
        if self.state is not IkeState.ESTABLISHED:
            return False
        for c in list(self.children.values()):
            if c.replaced_by == spi_in and c.rekeyed and not c.deleting:
                c.replaced_by = None
                c.delete_at = None
                self._queue_child_delete(c, "rekeyed")
                self.pump(now)
                return True
        return False

    def _queue_child_delete(self, c: ChildSa, reason: str) -> None:
        c.deleting = True
        self.request("delete_child", (c.spi_in, reason))

    # ------------------------------------------------------------- close

    def close(self, reason: str) -> None:
        """Forget this IKE SA and every Child SA of it, with events."""
        if self.state is IkeState.CLOSED:
            return
        established = self.state is IkeState.ESTABLISHED
        for c in list(self.children.values()):
            self._child_gone(c, reason)
        if established and self.tunnel is not None:
            self._emit(
                IkeSaDeleted(
                    self.tunnel.tunnel_id,
                    self.tunnel.account_id,
                    int.from_bytes(self.spi_i, "big"),
                    int.from_bytes(self.spi_r, "big"),
                    reason,
                )
            )
        self.engine.discard(self, reason)

    def _hand_over_pending(self) -> None:
        """A rekeyed IKE SA closes with our Child SA request unanswered: ask again
        on the IKE SA that now owns the Child SAs (strongSwan migrates such tasks
        too). The peer sorts out a rekey it had answered (``rekey_answer_lost``).

        The peer may have answered a CREATE_CHILD_SA and made the Child SA with
        the SPI we offered (its outbound SPI); we never learnt its keys. After
        asking again, a DELETE of that SPI (``delete_offered``) removes it there
        — §2.8.1 makes the initiator delete a redundant SA of its exchange, and
        this one may be exactly that (the peer decided a collision we never
        saw); a peer that made nothing ignores the unknown SPI (§3.11)."""
        req, owner = self.pending, self.owner()
        if req is None or owner is self:
            return
        if owner.state is not IkeState.ESTABLISHED and owner.state is not IkeState.REKEYED:
            return
        # a REKEYED owner is one waiting for the answer that decides a §2.8.2
        # collision: the request waits in its queue and moves on with the Child
        # SAs (_hand_to), or dies with them if that answer never comes
        ctx = req.ctx
        if req.kind == "rekey_child" and ctx.get("old") is not None:
            rekeyed = owner.children.get(ctx["old"])
            if rekeyed is not None:
                rekeyed.rekeying = False
            owner.request("rekey_child", ctx["old"])
            owner.request("delete_offered", ctx.pop("spi_in"))  # reserved until then
        elif req.kind == "new_child":
            owner.request("new_child", (ctx["suites"], ctx["group"], 0))
            owner.request("delete_offered", ctx.pop("spi_in"))
        elif req.kind == "delete_offered":
            owner.request("delete_offered", ctx.pop("offered"))
        elif req.kind == "delete_child":
            owner.request("delete_child", (ctx["spi_in"], ctx["reason"]))
            ctx.pop("spi_in")  # that SPI lives on in the successor: keep it reserved
        else:
            return
        if owner.state is IkeState.ESTABLISHED:
            owner.pump(self.engine.last_now)

    def _child_gone(self, c: ChildSa, reason: str) -> None:
        self.children.pop(c.spi_in, None)
        self.engine.release_spi(c.spi_in)
        if c.records is not None and self.tunnel is not None:
            self._emit(
                ChildSaDeleted(
                    self.tunnel.tunnel_id,
                    self.tunnel.account_id,
                    c.spi_in,
                    c.spi_out,
                    (c.records[0].key, c.records[1].key),
                    reason,
                )
            )

    def _revive_predecessor(self, gone: ChildSa) -> None:
        """The peer deleted the Child SA its own rekey had just made (``gone``,
        not itself superseded) without deleting the one it replaced: that one
        is the live SA again, not "rekeyed" (which would refuse its next rekey
        until it expired). Not when our own rekey already replaced it (§2.8.1:
        the peer deleted its redundant SA, and we delete the old one); if ours
        is still under way, the old one is live until it completes (it may be
        lost or handed to a new IKE SA, and must then be asked again)."""
        for old in self.children.values():
            if (
                old.unconfirmed_successor == gone.spi_in
                and old.rekeyed
                and old.replaced_by is None
                and not old.deleting
            ):
                old.rekeyed = False
                old.unconfirmed_successor = None
                self.engine.count("rekey_undone_by_peer")

    def local_delete(self, now: float) -> None:
        """Tell the peer the IKE SA is gone; events go out now (engine.delete_tunnel)."""
        if self.state is not IkeState.ESTABLISHED:
            self.close("local_delete")
            return
        for c in list(self.children.values()):
            self._child_gone(c, "local_delete")
        assert self.tunnel is not None
        self._emit(
            IkeSaDeleted(
                self.tunnel.tunnel_id,
                self.tunnel.account_id,
                int.from_bytes(self.spi_i, "big"),
                int.from_bytes(self.spi_r, "big"),
                "local_delete",
            )
        )
        self.state = IkeState.DELETING
        self.queue.clear()
        if self.pending is not None:
            self.pending = None
        self.request("delete_ike", None)
        self.pump(now)

    # ------------------------------------------------------------- Child SA install

    def make_child(
        self,
        *,
        suite: ChildSuite,
        spi_in: int,
        spi_out: int,
        keys: ChildKeys,
        we_initiated_exchange: bool,
        ts_local: list[Selector],
        ts_remote: list[Selector],
        now: float,
        old: ChildSa | None = None,
        pfs_hint: int | None = None,
    ) -> ChildSa:
        cfg = self.engine.config
        i2r = (keys.enc_i2r, keys.integ_i2r)
        r2i = (keys.enc_r2i, keys.integ_r2i)
        keys_out, keys_in = (i2r, r2i) if we_initiated_exchange else (r2i, i2r)
        rekey_at = now + self._jittered(cfg.child_lifetime)
        child = ChildSa(
            spi_in=spi_in,
            spi_out=spi_out,
            suite=suite,
            keys_in=keys_in,
            keys_out=keys_out,
            ts_local=tuple(_to_record(s) for s in ts_local),
            ts_remote=tuple(_to_record(s) for s in ts_remote),
            child_id=old.child_id if old else self.engine.new_child_id(),
            generation=old.generation + 1 if old else 0,
            created=now,
            rekey_at=rekey_at,
            expire_at=now + cfg.child_lifetime * (1 + cfg.expire_margin),
            pfs_hint=pfs_hint if pfs_hint is not None else (old.pfs_hint if old else None),
            replaces=(old.spi_in, old.spi_out) if old else None,
            outbound_held=old is not None and not we_initiated_exchange,
        )
        records = self._records(child)  # validates everything before any state changes
        if old is not None:
            old.rekeyed = True
            old.delete_at = None
        self.children[spi_in] = child
        self._publish(child, updated=False, records=records)
        return child

    def _records(self, c: ChildSa) -> tuple[SaRecord, SaRecord]:
        assert self.tunnel is not None
        t = self.tunnel
        replay = self.engine.config.replay_window if t.replay_protection else 0
        encap = self.udp_encap

        def rec(direction: Direction, spi: int, keys: tuple[bytes, bytes], old: int) -> SaRecord:
            enc, integ = keys
            salt = b""
            if c.suite.encr == 20:
                enc, salt = enc[:-4], enc[-4:]
            return SaRecord(
                account_id=t.account_id,
                tunnel_id=t.tunnel_id,
                spi=spi,
                direction=direction,
                local_addr=self.local[0],
                remote_addr=self.remote[0],
                udp_encap=encap,
                local_port=self.local[1] if encap else 0,
                remote_port=self.remote[1] if encap else 0,
                cipher=c.suite.cipher,
                integ=c.suite.integ_alg,
                enc_key=enc,
                salt=salt,
                integ_key=integ,
                replay_window=replay,
                ts_local=c.ts_local,
                ts_remote=c.ts_remote,
                child_id=c.child_id,
                generation=c.generation,
                created=self._unix(c.created),
                rekey_at=self._unix(c.rekey_at),
                expire_at=self._unix(c.expire_at),
                replaces=old,
            )

        return (
            rec(Direction.IN, c.spi_in, c.keys_in, c.replaces[0] if c.replaces else 0),
            rec(Direction.OUT, c.spi_out, c.keys_out, c.replaces[1] if c.replaces else 0),
        )

    def _publish(
        self, c: ChildSa, *, updated: bool, records: tuple[SaRecord, SaRecord] | None = None
    ) -> None:
        assert self.tunnel is not None
        c.records = records or self._records(c)
        t = self.tunnel
        held = c.outbound_held
        if updated:
            self._emit(ChildSaUpdated(t.tunnel_id, t.account_id, *c.records, held))
        else:
            self._emit(ChildSaInstalled(t.tunnel_id, t.account_id, *c.records, c.replaces, held))

    def _release_outbound(self, old: ChildSa) -> None:
        """``old`` is about to go (the peer deleted it, or it expired): the
        outbound SA of the Child SA that replaced it in the peer's rekey is
        published now (``ChildSa.outbound_held``), before ``old``'s records are
        tombstoned, so the workers always have one to send on."""
        succ = self.children.get(old.unconfirmed_successor or -1)
        if succ is not None and succ.outbound_held and not succ.deleting:
            succ.outbound_held = False
            self._publish(succ, updated=True)

    # ------------------------------------------------------------- establishment

    def _established(self, now: float) -> None:
        assert self.tunnel is not None and self.suite is not None
        self.state = IkeState.ESTABLISHED
        self.ike_rekey_at = now + self._jittered(self.engine.config.ike_lifetime)
        self.last_heard = now
        self.engine.established(self)
        self._emit(
            IkeSaEstablished(
                self.tunnel.tunnel_id,
                self.tunnel.account_id,
                int.from_bytes(self.spi_i, "big"),
                int.from_bytes(self.spi_r, "big"),
                self.initiator,
                self.local,
                self.remote,
                self.nat_detected,
                self.udp_encap,
                self.id_kind,
                self.suite.name,
            )
        )

    # ------------------------------------------------------------- persistence

    def to_state(self, shift: float) -> dict[str, Any]:
        """An established IKE SA as plain data (times relative to the export)."""
        assert self.tunnel is not None and self.suite is not None and self.keys is not None
        t, k, su = self.tunnel, self.keys, self.suite
        req = self.pending
        return {
            "role": self.initiator,
            "spi": [self.spi_i, self.spi_r],
            "state": self.state.value,
            "addr": [list(self.local), list(self.remote)],
            "nat": [self.nat_detected, self.udp_encap],
            "tunnel": [
                t.account_id,
                t.tunnel_id,
                t.local_addr,
                t.customer_endpoint,
                t.allow_null_cipher,
                t.replay_protection,
                [x.to_wire() for x in t.local_ts],
                [x.to_wire() for x in t.remote_ts],
            ],
            "id_kind": self.id_kind,
            "suite": [su.encr, su.key_bits, su.integ, su.prf, su.dh],
            "keys": [k.sk_d, k.sk_ai, k.sk_ar, k.sk_ei, k.sk_er, k.sk_pi, k.sk_pr],
            "mid": [self.peer_next, self.our_next, self.iv_counter],
            "last_response": self.last_response,
            "last_request": None
            if self.last_request is None
            else [self.last_request[0], list(self.last_request[1]), list(self.last_request[2])],
            # with what finishes a CREATE_CHILD_SA in flight after a restart
            # (_pending_ctx), and the SPI it offered: should its context be
            # lost, the Child SA the peer made of it is deleted there
            "pending": None
            if req is None
            else [
                req.kind,
                req.exchange,
                req.message_id,
                req.data,
                offered_spi(req),
                _pending_ctx(req),
            ],
            "ike_rekey_at": self.ike_rekey_at - shift if self.ike_rekey_at else 0.0,
            "created": self.created - shift,
            # a REKEYED IKE SA's way out (§2.18): without them it would come
            # back with no deadline and never be deleted
            "linger": self.linger_until - shift if self.linger_until else None,
            "retire": self.retire,
            # where the Child SAs went (our SPI of the successor), relinked at import
            "successor": None if self.successor is None else self.successor.our_spi,
            "children": [
                [
                    c.spi_in,
                    c.spi_out,
                    [c.suite.encr, c.suite.key_bits, c.suite.integ, c.suite.dh],
                    list(c.keys_in),
                    list(c.keys_out),
                    [x.to_wire() for x in c.ts_local],
                    [x.to_wire() for x in c.ts_remote],
                    c.child_id,
                    c.generation,
                    c.created - shift,
                    c.rekey_at - shift,
                    c.expire_at - shift,
                    c.pfs_hint,
                    list(c.replaces) if c.replaces else None,
                    c.rekeyed,
                    None if c.delete_at is None else c.delete_at - shift,
                    c.deleting,
                    c.replaced_by,
                    # a rekey the peer started, until it deletes the old Child SA:
                    # the new outbound SA stays held, the old one knows its successor
                    c.outbound_held,
                    c.unconfirmed_successor,
                    # made by our answer the peer may not have yet (§2.1)
                    None
                    if c.answered is None
                    else [c.answered[0], c.answered[1], c.answered[2] - shift],
                ]
                for c in self.children.values()
            ],
        }

    @classmethod
    def from_state(cls, engine: IkeEngine, d: dict[str, Any], now: float) -> IkeSa:
        """Rebuild from :meth:`to_state`; times re-based on ``now``."""
        from control.ike.engine import TunnelAuth

        spi_i, spi_r = d["spi"]
        sa = cls(engine, initiator=bool(d["role"]), spi_i=spi_i, spi_r=spi_r, now=now)
        sa.state = IkeState(d["state"])
        sa.local = (d["addr"][0][0], int(d["addr"][0][1]))
        sa.remote = (d["addr"][1][0], int(d["addr"][1][1]))
        sa.nat_detected, sa.udp_encap = bool(d["nat"][0]), bool(d["nat"][1])
        acc, tid, laddr, cust, null, replay, lts, rts = d["tunnel"]
        sa.tunnel = TunnelAuth(
            account_id=acc,
            tunnel_id=tid,
            psk=b"",  # not needed once authenticated: rekeys derive from SK_d
            local_addr=laddr,
            customer_endpoint=cust,
            allow_null_cipher=null,
            replay_protection=replay,
            local_ts=tuple(TrafficSelector.from_wire(x) for x in lts),
            remote_ts=tuple(TrafficSelector.from_wire(x) for x in rts),
        )
        sa.id_kind = d["id_kind"]
        sa.set_keys(IkeSuite(*d["suite"]), IkeKeys(*d["keys"]))
        sa.peer_next, sa.our_next, iv = d["mid"]
        # GCM IVs must never repeat under a key: skip ahead of anything sent
        # after this snapshot was taken.
        sa.iv_counter = iv + (1 << 24)
        sa.last_response = d["last_response"]
        lr = d.get("last_request")  # absent in older blobs: nothing then counts as a copy
        if lr is not None:
            sa.last_request = (lr[0], (lr[1][0], int(lr[1][1])), (lr[2][0], int(lr[2][1])))
        if d["pending"] is not None:
            kind, exchange, mid, data = d["pending"][:4]
            offered = d["pending"][4] if len(d["pending"]) > 4 else None
            kept = d["pending"][5] if len(d["pending"]) > 5 else None
            ctx: dict[str, Any] | None = {}
            if kept is not None and kind in ("rekey_child", "new_child", "rekey_ike"):
                try:
                    ctx = _restore_ctx(kind, kept)  # finished when the answer comes
                except (dhmod.DhError, KeyError, TypeError, ValueError):
                    ctx = None  # unusable: an orphan rather than a lost IKE SA
            elif kind not in ("dpd", "delete_ike"):
                ctx = None
            if ctx is None:
                # its context was not kept: the answer cannot be used
                kind = "orphan"
                ctx = {} if offered is None else {"offered": offered}
            sa.pending = OutRequest(kind, exchange, mid, data, now, now, 0, ctx)
        sa.ike_rekey_at = d["ike_rekey_at"] + now if d["ike_rekey_at"] else 0.0
        # not stored: heard from at ``now`` (the row's write time in the control
        # service); the first timer run spreads the first DPD (_spread_restored_dpd)
        sa.last_heard = now
        sa.restored = sa.state is IkeState.ESTABLISHED
        sa.created = float(d.get("created", 0.0)) + now
        if sa.state is IkeState.REKEYED:
            sa._restore_linger(d, now)
        for c in d["children"]:
            child = ChildSa(
                spi_in=c[0],
                spi_out=c[1],
                suite=ChildSuite(*c[2]),
                keys_in=(c[3][0], c[3][1]),
                keys_out=(c[4][0], c[4][1]),
                ts_local=tuple(TrafficSelector.from_wire(x) for x in c[5]),
                ts_remote=tuple(TrafficSelector.from_wire(x) for x in c[6]),
                child_id=c[7],
                generation=c[8],
                created=c[9] + now,
                rekey_at=c[10] + now,
                expire_at=c[11] + now,
                pfs_hint=c[12],
                replaces=(c[13][0], c[13][1]) if c[13] else None,
                rekeyed=c[14],
                delete_at=None if c[15] is None else c[15] + now,
                deleting=c[16],
                replaced_by=c[17] if len(c) > 17 else None,
                outbound_held=bool(c[18]) if len(c) > 18 else False,
                unconfirmed_successor=c[19] if len(c) > 19 else None,
                answered=None
                if len(c) <= 20 or c[20] is None
                else (c[20][0], int(c[20][1]), c[20][2] + now),
            )
            if child.deleting:
                # our DELETE for it was queued or in flight and is not kept (the
                # pending request comes back as an "orphan"): send it again, or
                # the Child SA would stay half-deleted for good; a peer that
                # already deleted it ignores the unknown SPI (§3.11)
                child.deferred_delete = ("rekeyed" if child.rekeyed else "local_delete", now)
            child.records = sa._records(child)
            sa.children[child.spi_in] = child
        req = sa.pending
        if req is not None and req.kind == "rekey_child":
            rekeyed = sa.children.get(req.ctx["old"])
            if rekeyed is not None:
                rekeyed.rekeying = True  # not rekeyed twice while that answer is due
        return sa

    def _restore_linger(self, d: dict[str, Any], now: float) -> None:
        """A REKEYED IKE SA's linger and whether we delete it (§2.18: the
        rekey's initiator does), re-based on ``now``.

        Rows written before these were stored have neither; nor does one whose
        linger already ran out (its DELETE in flight is ``pending`` then). Such
        an SA lingers ``old_ike_sa_grace`` from ``now`` and is then forgotten
        (``retire`` unknown: not deleted with the peer, whose own linger or
        DELETE ends its copy) — unless our DELETE of it is in flight, which
        ends it when answered or given up. A REKEYED SA with neither a linger
        nor a request in flight would never run again."""
        linger = d.get("linger")
        self.retire = bool(d.get("retire", False))
        if isinstance(linger, int | float):
            self.linger_until = linger + now
        elif self.pending is None or self.pending.kind != "delete_ike":
            self.linger_until = now + self.engine.config.old_ike_sa_grace

    def _forget_handshake(self) -> None:
        self.ni = self.nr = self.init_request = self.init_response = b""
        self.kex = None
        self.auth_ctx = {}

    # ------------------------------------------------------------- responder: IKE_AUTH

    def on_ike_auth(self, msg: wire.Message, now: float) -> tuple[list[Payload], None]:
        """§1.2 message 3 → 4: identity, PSK AUTH (§2.15), first Child SA."""
        assert self.prf is not None and self.keys is not None
        idi = msg.get(PayloadType.IDI)
        auth = msg.get(PayloadType.AUTH)
        if not isinstance(idi, IdPayload) or not isinstance(auth, AuthPayload):
            raise InvalidSyntax("IKE_AUTH without IDi or AUTH")
        ident = self.engine.parse_identity(idi, self.local[0], self.remote[0])
        tunnel = self.engine.lookup(ident) if ident is not None else None
        if ident is None or tunnel is None:
            self._emit(AuthenticationFailed(self.remote, "unknown_id", id_text(idi)))
            self.engine.count("auth_unknown_id")
            raise AuthenticationFailedError("unknown_id")
        expected = psk_auth(
            self.prf,
            tunnel.psk,
            signed_octets(self.prf, self.init_request, self.nr, self.keys.sk_pi, idi.body),
        )
        if auth.method != AuthMethod.PSK or not compare_digest(expected, auth.data):
            self._emit(AuthenticationFailed(self.remote, "bad_auth", id_text(idi)))
            self.engine.count("auth_bad_psk")
            raise AuthenticationFailedError("bad_auth")
        self.tunnel = tunnel
        self.id_kind = ident.kind
        # Our IDr: echo the one the peer asked for, else mirror its IDi's form.
        idr_req = msg.get(PayloadType.IDR)
        if isinstance(idr_req, IdPayload):
            idr = IdPayload(idr_req.id_type, idr_req.data)
        elif idi.id_type == IdType.IPV4_ADDR:
            idr = IdPayload(IdType.IPV4_ADDR, ipaddress.ip_address(self.local[0]).packed)
        else:
            idr = IdPayload(idi.id_type, idi.data)
        our_auth = psk_auth(
            self.prf,
            tunnel.psk,
            signed_octets(self.prf, self.init_response, self.ni, self.keys.sk_pr, idr.body),
        )
        if msg.notify(Notify.INITIAL_CONTACT) is not None:
            # §2.4: the peer has no other IKE SA with us: drop older ones of this tunnel.
            self.engine.initial_contact(self, now)
        out: list[Payload] = [
            Payload(PayloadType.IDR, idr),
            Payload(PayloadType.AUTH, AuthPayload(AuthMethod.PSK, our_auth)),
        ]
        ni, nr = self.ni, self.nr
        self._established(now)
        try:
            out += self._respond_child(msg, now, ni=ni, nr=nr, pfs=False, old=None)
        except IkeError as exc:
            # §1.2: the IKE SA stands even if the first Child SA is refused.
            self._emit(NegotiationFailed(self.remote, self.tunnel_id, exc.notify.name, True))
            out.append(Payload(PayloadType.NOTIFY, NotifyPayload(exc.notify, exc.data)))
        self._forget_handshake()
        return out, None

    def _respond_child(
        self,
        msg: wire.Message,
        now: float,
        *,
        ni: bytes,
        nr: bytes,
        pfs: bool,
        old: ChildSa | None,
    ) -> list[Payload]:
        """Select, narrow and install a Child SA requested by the peer (§1.3.1, §2.17)."""
        assert self.tunnel is not None and self.prf is not None and self.keys is not None
        sa = msg.get(PayloadType.SA)
        tsi = msg.get(PayloadType.TSI)
        tsr = msg.get(PayloadType.TSR)
        if not isinstance(sa, SaPayload) or not isinstance(tsi, TsPayload):
            raise InvalidSyntax("Child SA request without SA or TSi")
        if not isinstance(tsr, TsPayload):
            raise InvalidSyntax("Child SA request without TSr")
        if (
            len([c for c in self.children.values() if not c.rekeyed])
            >= (self.engine.config.max_child_sas)
            and old is None
        ):
            raise NoAdditionalSas()
        try:
            proposal, suite = select_child(sa, allow_null=self.tunnel.allow_null_cipher, pfs=pfs)
        except NoProposalChosen:
            raise NoProposalChosenError() from None
        g_ir: bytes | None = None
        ke_out: list[Payload] = []
        if suite.dh is not None:
            ke = msg.get(PayloadType.KE)
            if not isinstance(ke, KePayload) or ke.group != suite.dh:
                raise InvalidKePayload(data=suite.dh.to_bytes(2, "big"))
            kex = dhmod.generate(suite.dh)
            try:
                g_ir = kex.shared(ke.data)
            except dhmod.DhError:
                raise InvalidSyntax("bad KE") from None
            ke_out = [Payload(PayloadType.KE, KePayload(suite.dh, kex.public))]
        remote_sel = narrow(tsi.selectors, self.tunnel.remote_ts)
        local_sel = narrow(tsr.selectors, self.tunnel.local_ts)
        if not remote_sel or not local_sel:
            raise TsUnacceptable()
        keys = child_keymat(
            self.prf,
            self.keys.sk_d,
            ni,
            nr,
            enc_len=suite.enc_key_len,
            integ_len=suite.integ_key_len,
            g_ir=g_ir,
        )
        spi_in = self.engine.allocate_spi()
        hint = None
        if not pfs:
            groups = {t.id for t in proposal.transforms if t.type == TransformType.DH}
            hint = next((g for g in (14, 5) if g in groups), None)
        self.make_child(
            suite=suite,
            spi_in=spi_in,
            spi_out=int.from_bytes(proposal.spi, "big"),
            keys=keys,
            we_initiated_exchange=False,
            ts_local=local_sel,
            ts_remote=remote_sel,
            now=now,
            old=old,
            pfs_hint=hint if not pfs else suite.dh,
        )
        num = proposal.num
        return [
            Payload(PayloadType.SA, child_sa_payload(suite, spi_in.to_bytes(4, "big"), num)),
            *([Payload(PayloadType.NONCE, NoncePayload(nr))] if old is not None or pfs else []),
            *ke_out,
            Payload(PayloadType.TSI, TsPayload(remote_sel)),
            Payload(PayloadType.TSR, TsPayload(local_sel)),
        ]

    # ------------------------------------------------------------- responder: CREATE_CHILD_SA

    def on_create_child_sa(self, msg: wire.Message, now: float) -> tuple[list[Payload], None]:
        """§1.3: new Child SA, Child SA rekey (REKEY_SA) or IKE SA rekey (§1.3.2)."""
        sa = msg.get(PayloadType.SA)
        nonce = msg.get(PayloadType.NONCE)
        if not isinstance(sa, SaPayload) or not isinstance(nonce, NoncePayload):
            raise InvalidSyntax("CREATE_CHILD_SA without SA or Ni")
        if sa.proposals and sa.proposals[0].protocol == Protocol.IKE:
            ours = self.pending if self.pending and self.pending.kind == "rekey_ike" else None
            # §2.8.2: if we are rekeying this IKE SA ourselves, answer as usual;
            # once our own answer arrives, the lowest nonce decides which of the
            # two new IKE SAs survives (_finish_ike_rekey).
            return self._respond_ike_rekey(msg, sa, nonce.nonce, now, collision=ours), None
        old: ChildSa | None = None
        rekey = msg.notify(Notify.REKEY_SA)
        if rekey is not None:
            spi = int.from_bytes(rekey.spi, "big") if len(rekey.spi) == 4 else -1
            old = next((c for c in self.children.values() if c.spi_out == spi), None)
            if old is None or old.deleting:
                raise ChildSaNotFound(data=b"")
            lost = self.children.get(old.unconfirmed_successor or -1)
            if old.rekeyed and lost is not None:
                # A new exchange rekeying it again: the peer never saw our answer to
                # its first rekey (its IKE SA moved on meanwhile). That replacement
                # exists only here; drop it and serve this request.
                self.engine.count("rekey_answer_lost")
                self._child_gone(lost, "rekey_lost")
                old.rekeyed = False
                old.unconfirmed_successor = None
            elif old.rekeyed:
                # §2.8.1: already rekeyed (collision we lost or a late duplicate)
                raise TemporaryFailure()
        nr = self.engine.rng(NONCE_LEN)
        before = set(self.children)
        payloads = self._respond_child(msg, now, ni=nonce.nonce, nr=nr, pfs=True, old=old)
        req = self.pending
        (created,) = set(self.children) - before
        # the peer holds it once our answer arrives (IKE_AUTH's first Child SA
        # needs no such care: without that answer the peer has no IKE SA)
        self.children[created].answered = (self.our_spi, self.peer_next, now)
        if old is not None:
            old.unconfirmed_successor = created
        if (
            old is not None
            and req is not None
            and req.kind == "rekey_child"
            and req.ctx.get("old") == old.spi_in
        ):
            # §2.8.1 simultaneous rekey: decided when our own response arrives.
            req.ctx["collision"] = (created, nonce.nonce, nr)
        return payloads, None

    def _respond_ike_rekey(
        self,
        msg: wire.Message,
        sa: SaPayload,
        ni: bytes,
        now: float,
        collision: OutRequest | None = None,
    ) -> list[Payload]:
        """§2.18: the new IKE SA's keys come from the old SK_d and a fresh DH."""
        assert self.prf is not None and self.keys is not None
        try:
            proposal, suite = select_ike(sa)
        except NoProposalChosen:
            raise NoProposalChosenError() from None
        if len(proposal.spi) != 8:
            raise InvalidSyntax("IKE rekey proposal without an 8-octet SPI")
        ke = msg.get(PayloadType.KE)
        if not isinstance(ke, KePayload) or ke.group != suite.dh:
            raise InvalidKePayload(data=suite.dh.to_bytes(2, "big"))
        kex = dhmod.generate(suite.dh)
        try:
            g_ir = kex.shared(ke.data)
        except dhmod.DhError:
            raise InvalidSyntax("bad KE") from None
        nr = self.engine.rng(NONCE_LEN)
        new_spi = self.engine.allocate_ike_spi()
        theirs = self._successor(
            suite, g_ir, ni, nr, spi_i=proposal.spi, spi_r=new_spi, initiator=False, now=now
        )
        if collision is not None:
            self.engine.count("ike_rekey_collision")
            collision.ctx["collision"] = (theirs, ni, nr)
        return [
            Payload(PayloadType.SA, ike_sa_payload(suite, proposal.num, new_spi)),
            Payload(PayloadType.NONCE, NoncePayload(nr)),
            Payload(PayloadType.KE, KePayload(suite.dh, kex.public)),
        ]

    def _successor(
        self,
        suite: IkeSuite,
        g_ir: bytes,
        ni: bytes,
        nr: bytes,
        *,
        spi_i: bytes,
        spi_r: bytes,
        initiator: bool,
        now: float,
    ) -> IkeSa:
        """Build the rekeyed IKE SA, move the Child SAs to it, retire this one."""
        new = self._rekeyed_sa(
            suite, g_ir, ni, nr, spi_i=spi_i, spi_r=spi_r, initiator=initiator, now=now
        )
        self._hand_to(new, now)
        return new

    def _collision_owner(self) -> IkeSa | None:
        """The old IKE SA whose rekey of ours is in flight and collided with the
        peer's rekey that created this IKE SA (§2.8.2), if any."""
        for spi in self.engine.by_tunnel.get(self.tunnel_id or "", ()):
            sa = self.engine.sas.get(spi)
            req = sa.pending if sa is not None else None
            if req is not None and req.kind == "rekey_ike":
                collision = req.ctx.get("collision")
                if collision is not None and collision[0] is self:
                    return sa
        return None

    def _rekeyed_sa(
        self,
        suite: IkeSuite,
        g_ir: bytes,
        ni: bytes,
        nr: bytes,
        *,
        spi_i: bytes,
        spi_r: bytes,
        initiator: bool,
        now: float,
    ) -> IkeSa:
        """§2.18: a new IKE SA keyed from this one's SK_d, owning nothing yet."""
        assert self.prf is not None and self.keys is not None and self.suite is not None
        seed = rekey_skeyseed(self.prf, self.keys.sk_d, g_ir, ni, nr)
        keys = derive_ike_keys(
            Prf(suite.prf),
            seed,
            ni,
            nr,
            spi_i,
            spi_r,
            enc_len=suite.enc_key_len,
            integ_len=suite.integ_key_len,
        )
        new = IkeSa(self.engine, initiator=initiator, spi_i=spi_i, spi_r=spi_r, now=now)
        new.local, new.remote = self.local, self.remote
        new.nat_detected, new.udp_encap = self.nat_detected, self.udp_encap
        new.tunnel, new.id_kind = self.tunnel, self.id_kind
        new.set_keys(suite, keys)
        new.state = IkeState.ESTABLISHED
        new.last_heard = now
        new.ike_rekey_at = now + new._jittered(self.engine.config.ike_lifetime)
        return new

    def _hand_to(self, new: IkeSa, now: float) -> None:
        """Move the Child SAs and queued Child SA work to ``new`` (registered
        here) and leave this IKE SA REKEYED; ``IkeSaRekeyed`` self → new."""
        new.children = self.children
        self.children = {}
        self.successor = new
        # queued Child SA work continues on the new IKE SA (a marked-for-delete
        # Child SA must still be deleted there)
        for kind, arg in self.queue:
            if kind in CHILD_WORK:
                new.queue.append((kind, arg))
        self.queue.clear()
        self.state = IkeState.REKEYED
        self.linger_until = now + 4 * self.engine.config.retransmit_timeout * 8
        self.engine.register(new)
        self.engine.established(new)
        new.pump(now)
        assert self.tunnel is not None
        self._emit(
            IkeSaRekeyed(
                self.tunnel.tunnel_id,
                self.tunnel.account_id,
                int.from_bytes(self.spi_i, "big"),
                int.from_bytes(self.spi_r, "big"),
                int.from_bytes(new.spi_i, "big"),
                int.from_bytes(new.spi_r, "big"),
                new.suite.name if new.suite else "",
            )
        )

    def on_busy(self, msg: wire.Message, now: float) -> tuple[list[Payload], None]:
        """§2.25: this IKE SA is being rekeyed or deleted; try again later."""
        raise TemporaryFailure()

    # ------------------------------------------------------------- responder: INFORMATIONAL

    def on_informational(
        self, msg: wire.Message, now: float
    ) -> tuple[list[Payload], Callable[[], None] | None]:
        """§1.4: DELETE of Child SAs or of this IKE SA; empty = liveness check."""
        out_spis: list[bytes] = []
        delete_ike = False
        for body in msg.all(PayloadType.DELETE):
            assert isinstance(body, DeletePayload)
            if body.protocol == Protocol.IKE:
                delete_ike = True
            elif body.protocol == Protocol.ESP:
                for raw in body.spis:
                    spi = int.from_bytes(raw, "big")
                    owner = self.owner()
                    c = next((c for c in owner.children.values() if c.spi_out == spi), None)
                    if c is None:
                        continue  # §3.11: unknown SPIs are ignored
                    out_spis.append(c.spi_in.to_bytes(4, "big"))
                    owner._release_outbound(c)
                    owner._child_gone(c, "rekeyed" if c.rekeyed else "peer_delete")
                    if not c.rekeyed:
                        owner._revive_predecessor(c)
        if delete_ike:
            if self.state is IkeState.ESTABLISHED and self._collision_owner() is not None:
                # §2.8.2: the peer found the IKE SA it created in a simultaneous
                # rekey redundant and deleted it before our own rekey's answer
                # arrived (lost or reordered). Keep its Child SAs for the new IKE
                # SA that answer creates (_finish_ike_rekey); no events.
                self.engine.count("ike_rekey_collision_early_delete")
                self.state = IkeState.REKEYED
                self.linger_until = now + 4 * self.engine.config.retransmit_timeout * 8
                return [], None
            req = self.pending
            if req is not None and req.kind == "rekey_ike" and "collision" in req.ctx:
                # §2.8.2: the peer won the collision and deleted the old IKE SA
                # before its answer to our rekey reached us (lost). The IKE SA it
                # made for our request is redundant; without that answer we hold
                # no keys for it, so only the peer can time it out. Ours (the one
                # the peer made, holding the Child SAs) is the survivor.
                self.engine.count("ike_rekey_collision_abandoned")
            # §1.4.1: answer with an empty INFORMATIONAL, then the IKE SA is gone.
            reason = "rekeyed" if self.state is IkeState.REKEYED else "peer_delete"
            return [], lambda: self.close(reason)
        if out_spis:
            return [Payload(PayloadType.DELETE, DeletePayload(Protocol.ESP, out_spis))], None
        return [], None

    # ------------------------------------------------------------- our requests

    def build_dpd(self, arg: None, now: float) -> tuple[int, list[Payload], dict[str, Any]]:
        return ExchangeType.INFORMATIONAL, [], {}

    def build_delete_ike(self, arg: None, now: float) -> tuple[int, list[Payload], dict[str, Any]]:
        return (
            ExchangeType.INFORMATIONAL,
            [Payload(PayloadType.DELETE, DeletePayload(Protocol.IKE, []))],
            {},
        )

    def build_delete_child(
        self, arg: tuple[int, str], now: float
    ) -> tuple[int, list[Payload], dict[str, Any]] | None:
        spi_in, reason = arg
        c = self.children.get(spi_in)
        if c is None:
            return None
        if self._unconfirmed(c, now):
            c.deferred_delete = (reason, now + self.engine.config.retransmit_timeout)
            self.engine.count("delete_deferred_unconfirmed")
            return None
        payload = DeletePayload(Protocol.ESP, [spi_in.to_bytes(4, "big")])
        return (
            ExchangeType.INFORMATIONAL,
            [Payload(PayloadType.DELETE, payload)],
            {"spi_in": spi_in, "reason": reason},
        )

    def build_delete_offered(
        self, spi: int, now: float
    ) -> tuple[int, list[Payload], dict[str, Any]] | None:
        """DELETE of the SPI we offered in a CREATE_CHILD_SA whose answer never
        came (``_hand_over_pending``); released once the peer answered."""
        if spi in self.children:  # cannot happen (never installed); keep it safe
            return None
        payload = DeletePayload(Protocol.ESP, [spi.to_bytes(4, "big")])
        return ExchangeType.INFORMATIONAL, [Payload(PayloadType.DELETE, payload)], {"offered": spi}

    def build_rekey_child(
        self, arg: int | tuple[int, int | None, int], now: float
    ) -> tuple[int, list[Payload], dict[str, Any]] | None:
        """§1.3.3: CREATE_CHILD_SA with N(REKEY_SA) carrying our inbound SPI.

        PFS: the group the Child SA already uses or the peer listed; a peer that
        wants PFS we did not know about answers NO_PROPOSAL_CHOSEN or
        INVALID_KE_PAYLOAD and we retry (at most twice) with 14, then 5."""
        if isinstance(arg, tuple):
            spi_in, group, attempt = arg
        else:
            spi_in, group, attempt = arg, -1, 0
        c = self.children.get(spi_in)
        if c is None or c.rekeyed or c.deleting or c.rekeying or self._rekey_sent_elsewhere(spi_in):
            return None
        cfg = self.engine.config
        if self._unconfirmed(c, now):
            # §2.8/§2.25: the peer may not hold this Child SA yet (our answer that
            # created it lost and being retransmitted); rekeying it now would get
            # CHILD_SA_NOT_FOUND and make us drop a Child SA the peer is about to
            # install. Ask again shortly (on_timer), once the peer moved on.
            c.rekey_at = min(c.rekey_at, now + cfg.retransmit_timeout)
            self.engine.count("rekey_deferred_unconfirmed")
            return None
        c.rekeying = True
        if group == -1:
            group = c.suite.dh if c.suite.dh is not None else c.pfs_hint
        built = self._child_request(
            c.suite, group, now, old=c, ts_local=c.ts_local, ts_remote=c.ts_remote
        )
        built[2]["attempt"] = attempt
        return built

    def _rekey_sent_elsewhere(self, spi_in: int) -> bool:
        """Our rekey of this Child SA is still in flight on another IKE SA of
        the tunnel (one it moved from): a second rekey would let the peer drop
        the first one's SA (``rekey_answer_lost``) and then install it again
        from its cached answer to our retransmission. ``rekeying`` marks this
        while we run; an IKE SA restored after a restart, whose Child SAs
        moved on, can only be found by looking."""
        assert self.tunnel is not None
        for spi in self.engine.by_tunnel.get(self.tunnel.tunnel_id, ()):
            sa = self.engine.sas.get(spi)
            req = None if sa is None or sa is self else sa.pending
            if req is not None and req.kind == "rekey_child" and req.ctx.get("old") == spi_in:
                return True
        return False

    def build_new_child(
        self, arg: tuple[list[ChildSuite], int | None, int], now: float
    ) -> tuple[int, list[Payload], dict[str, Any]] | None:
        assert self.tunnel is not None
        suites, group, attempt = arg
        built = self._child_request(
            suites,
            group,
            now,
            old=None,
            ts_local=self.tunnel.local_ts,
            ts_remote=self.tunnel.remote_ts,
        )
        built[2]["attempt"] = attempt
        return built

    def _unconfirmed(self, c: ChildSa, now: float) -> bool:
        """The peer may not hold ``c`` yet: our answer creating it is not known to
        have arrived (``ChildSa.answered``), and the peer could still be
        retransmitting its request (``IkeConfig.peer_answer_grace``)."""
        a = c.answered
        return a is not None and now < a[2] + self.engine.config.peer_answer_grace

    def _child_request(
        self,
        suites: ChildSuite | list[ChildSuite],
        group: int | None,
        now: float,
        *,
        old: ChildSa | None,
        ts_local: tuple[TrafficSelector, ...],
        ts_remote: tuple[TrafficSelector, ...],
    ) -> tuple[int, list[Payload], dict[str, Any]]:
        ni = self.engine.rng(NONCE_LEN)
        spi_in = self.engine.allocate_spi()
        offer_list = suites if isinstance(suites, list) else [suites]
        offers = [ChildSuite(s.encr, s.key_bits, s.integ, group) for s in offer_list]
        payloads: list[Payload] = []
        if old is not None:
            payloads.append(
                Payload(
                    PayloadType.NOTIFY,
                    NotifyPayload(
                        Notify.REKEY_SA, b"", Protocol.ESP, old.spi_in.to_bytes(4, "big")
                    ),
                )
            )
        payloads.append(Payload(PayloadType.SA, child_offer(offers, spi_in.to_bytes(4, "big"))))
        payloads.append(Payload(PayloadType.NONCE, NoncePayload(ni)))
        kex = None
        if group:
            kex = dhmod.generate(group)
            payloads.append(Payload(PayloadType.KE, KePayload(group, kex.public)))
        payloads.append(Payload(PayloadType.TSI, TsPayload([_to_selector(t) for t in ts_local])))
        payloads.append(Payload(PayloadType.TSR, TsPayload([_to_selector(t) for t in ts_remote])))
        ctx = {
            "ni": ni,
            "spi_in": spi_in,
            "kex": kex,
            "old": old.spi_in if old else None,
            "suites": offer_list,
            "group": group,
        }
        return ExchangeType.CREATE_CHILD_SA, payloads, ctx

    def build_rekey_ike(
        self, arg: int | None, now: float
    ) -> tuple[int, list[Payload], dict[str, Any]] | None:
        """§1.3.2: SA (IKE, new SPIi), Ni, KEi."""
        assert self.suite is not None
        group = arg or self.suite.dh
        suite = IkeSuite(
            self.suite.encr, self.suite.key_bits, self.suite.integ, self.suite.prf, group
        )
        ni = self.engine.rng(NONCE_LEN)
        new_spi = self.engine.allocate_ike_spi()
        kex = dhmod.generate(group)
        payloads = [
            Payload(PayloadType.SA, ike_sa_payload(suite, 1, new_spi)),
            Payload(PayloadType.NONCE, NoncePayload(ni)),
            Payload(PayloadType.KE, KePayload(group, kex.public)),
        ]
        ctx = {"ni": ni, "spi": new_spi, "kex": kex, "suite": suite}
        return ExchangeType.CREATE_CHILD_SA, payloads, ctx

    # ------------------------------------------------------------- responses to ours

    def _error_notify(self, msg: wire.Message) -> NotifyPayload | None:
        for n in msg.notifies():
            if n.type < 16384:
                return n
        return None

    def on_informational_response(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        if req.kind == "delete_ike":
            self.engine.discard(self, "local_delete")
            return
        if req.kind == "delete_child":
            owner = self.owner()
            c = owner.children.get(req.ctx["spi_in"])
            if c is not None:
                owner._release_outbound(c)
                owner._child_gone(c, req.ctx["reason"])
        elif req.kind == "delete_offered":
            self.engine.release_spi(req.ctx["offered"])
        # dpd: hearing back is all we wanted (last_heard already moved)

    def on_create_child_sa_response(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        err = self._error_notify(msg)
        if req.kind == "rekey_child" and req.ctx.get("old") is not None:
            rekeyed = self.owner().children.get(req.ctx["old"])
            if rekeyed is not None:
                rekeyed.rekeying = False
        if req.kind == "orphan":
            # a request restored by import_state whose context (DH key) was not
            # kept: we cannot install what the peer made of it, so if the peer
            # made a Child SA (with the SPI we offered), it is deleted there —
            # else the peer alone would hold it (and may send on it)
            self.engine.count("orphan_response")
            offered = req.ctx.get("offered")
            if offered is not None:
                if err is None:
                    self.owner().request("delete_offered", offered)
                else:
                    self.engine.release_spi(offered)
            return
        if req.kind == "rekey_ike":
            if err is not None:
                self._child_request_failed(err, req)
                return
            self._finish_ike_rekey(msg, req, now)
            return
        ctx = req.ctx
        if err is not None:
            self.engine.release_spi(ctx["spi_in"])
            attempt = ctx.get("attempt", 0)
            group: int | None = None
            if err.type == Notify.INVALID_KE_PAYLOAD and len(err.data) == 2:
                group = int.from_bytes(err.data, "big")
            elif err.type == Notify.NO_PROPOSAL_CHOSEN and ctx["group"] is None:
                group = 14
            elif err.type == Notify.NO_PROPOSAL_CHOSEN and ctx["group"] == 14:
                group = 5
            if group in (14, 5) and attempt < 2:
                if req.kind == "rekey_child" and ctx["old"] is not None:
                    self.queue.appendleft(("rekey_child", (ctx["old"], group, attempt + 1)))
                else:
                    self.queue.appendleft(("new_child", (ctx["suites"], group, attempt + 1)))
                return
            self._child_request_failed(err, req)
            return
        try:
            self._finish_child(msg, req, now)
        except (IkeError, NoProposalChosen, dhmod.DhError):
            self.engine.release_spi(ctx["spi_in"])
            self.engine.count("bad_child_response")

    def _child_request_failed(self, err: NotifyPayload, req: OutRequest) -> None:
        self._emit(NegotiationFailed(self.remote, self.tunnel_id, notify_name(err.type), False))
        old = req.ctx.get("old")
        if err.type == Notify.CHILD_SA_NOT_FOUND and req.kind == "rekey_child" and old is not None:
            # §3.10.1: the peer has no such Child SA (e.g. our answer creating it was
            # lost while the IKE SA was rekeyed): it is of no use, remove it here too
            # — with a DELETE (§1.4.1), so that if the peer does hold it after all
            # (its view changed since it answered) it goes on both sides and neither
            # keeps an orphan; an SPI the peer does not know is ignored (§3.11).
            owner = self.owner()
            c = owner.children.get(old)
            if c is not None and not c.deleting:
                owner._queue_child_delete(c, "peer_lost")
                owner.pump(self.engine.last_now)

    def _finish_child(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        assert self.prf is not None and self.keys is not None and self.tunnel is not None
        ctx = req.ctx
        sa = msg.get(PayloadType.SA)
        nonce = msg.get(PayloadType.NONCE)
        tsi, tsr = msg.get(PayloadType.TSI), msg.get(PayloadType.TSR)
        if not (
            isinstance(sa, SaPayload)
            and isinstance(nonce, NoncePayload)
            and isinstance(tsi, TsPayload)
            and isinstance(tsr, TsPayload)
            and len(sa.proposals) == 1
        ):
            raise InvalidSyntax("bad CREATE_CHILD_SA response")
        proposal, suite = select_child(sa, allow_null=True, pfs=True)
        # the responder may only narrow what we offered (§2.9)
        ts_local = narrow(tsi.selectors, self.tunnel.local_ts)
        ts_remote = narrow(tsr.selectors, self.tunnel.remote_ts)
        if not ts_local or not ts_remote:
            raise TsUnacceptable()
        g_ir = None
        if suite.dh is not None:
            ke = msg.get(PayloadType.KE)
            kex = ctx["kex"]
            if not isinstance(ke, KePayload) or kex is None or ke.group != kex.group:
                raise InvalidSyntax("KE missing or of another group")
            g_ir = kex.shared(ke.data)
        keys = child_keymat(
            self.prf,
            self.keys.sk_d,
            ctx["ni"],
            nonce.nonce,
            enc_len=suite.enc_key_len,
            integ_len=suite.integ_key_len,
            g_ir=g_ir,
        )
        owner = self.owner()  # the IKE SA may have been rekeyed meanwhile
        old = owner.children.get(ctx["old"]) if ctx["old"] is not None else None
        child = owner.make_child(
            suite=suite,
            spi_in=ctx["spi_in"],
            spi_out=int.from_bytes(proposal.spi, "big"),
            keys=keys,
            we_initiated_exchange=True,
            ts_local=ts_local,
            ts_remote=ts_remote,
            now=now,
            old=old,
            pfs_hint=ctx["group"],
        )
        collision = ctx.get("collision")
        if collision is not None:
            # §2.8.1: of the two new SAs, the one made with the lowest of the four
            # nonces is redundant and closed by whoever created it; the other
            # one's creator deletes the old SA.
            _peer_spi, peer_ni, our_nr = collision
            lowest = min(ctx["ni"], nonce.nonce, peer_ni, our_nr)
            self.engine.count("rekey_collision")
            if lowest in (ctx["ni"], nonce.nonce):
                owner._queue_child_delete(child, "rekeyed")
                owner.pump(now)
                return
            # else the peer deletes its redundant SA and we delete the old one
        if old is not None:
            # make-before-break: the old SA goes once the new one is on every
            # worker (engine.child_sa_ready), or after rekey_delete_delay at most
            old.replaced_by = child.spi_in
            old.delete_at = now + self.engine.config.rekey_delete_delay

    def _finish_ike_rekey(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        ctx = req.ctx
        sa = msg.get(PayloadType.SA)
        nonce = msg.get(PayloadType.NONCE)
        ke = msg.get(PayloadType.KE)
        if not (
            isinstance(sa, SaPayload)
            and isinstance(nonce, NoncePayload)
            and isinstance(ke, KePayload)
            and len(sa.proposals) == 1
            and len(sa.proposals[0].spi) == 8
        ):
            self.engine.count("bad_rekey_response")
            return
        try:
            _, suite = select_ike(sa)
            g_ir = ctx["kex"].shared(ke.data)
        except (NoProposalChosen, dhmod.DhError):
            self.engine.count("bad_rekey_response")
            return
        ours = self._rekeyed_sa(
            suite,
            g_ir,
            ctx["ni"],
            nonce.nonce,
            spi_i=ctx["spi"],
            spi_r=sa.proposals[0].spi,
            initiator=True,
            now=now,
        )
        collision = ctx.get("collision")
        if collision is None:
            self._hand_to(ours, now)
        else:
            # §2.8.2: both sides rekeyed at once and we answered the peer's rekey
            # too, creating ``theirs`` (which holds the Child SAs now). Of the two
            # new IKE SAs, the one with the lowest of the four nonces is redundant
            # and deleted by its creator; the survivor inherits the Child SAs and
            # its creator deletes the old IKE SA.
            theirs, their_ni, our_nr = collision
            if min(ctx["ni"], nonce.nonce, their_ni, our_nr) in (ctx["ni"], nonce.nonce):
                # ours is redundant: never announced, deleted by us right away;
                # the peer deletes this old IKE SA (it lingers until then).
                self.engine.count("ike_rekey_collision_lost")
                if theirs.state is IkeState.REKEYED and theirs.successor is None:
                    theirs.close("peer_delete")  # the peer deleted the survivor too
                ours.state = IkeState.DELETING
                self.engine.register(ours)
                ours.request("delete_ike", None)
                ours.pump(now)
                return
            # theirs is redundant: the peer deletes it; the Child SAs move on to
            # ours (IkeSaRekeyed theirs → ours) and we delete this old IKE SA.
            self.engine.count("ike_rekey_collision_won")
            alive = self.engine.sas.get(theirs.our_spi) is theirs
            if alive and theirs.successor is None:
                deleted = theirs.state is IkeState.REKEYED  # the peer's DELETE came first
                theirs._hand_to(ours, now)
                if deleted:
                    self.engine.discard(theirs, "rekeyed")
            else:  # theirs is already gone: nothing to inherit
                self.engine.register(ours)
                self.engine.established(ours)
            self.successor = ours
        self.queue.clear()
        self.retire = True
        self.linger_until = now + self.engine.config.old_ike_sa_grace

    # ------------------------------------------------------------- initiator: handshake

    def send_init(self, now: float, cookie: bytes | None = None) -> None:
        """§1.2 message 1 (and its retry with a COOKIE or another KE group)."""
        assert self.kex is not None
        ctx = self.auth_ctx
        zero = bytes(8)
        payloads: list[Payload] = []
        if cookie is not None:
            payloads.append(Payload(PayloadType.NOTIFY, NotifyPayload(Notify.COOKIE, cookie)))
        payloads += ctx.get("extra", {}).get("init", [])
        payloads += [
            Payload(PayloadType.SA, ike_offer(ctx["ike_suites"])),
            Payload(PayloadType.KE, KePayload(self.kex.group, self.kex.public)),
            Payload(PayloadType.NONCE, NoncePayload(self.ni)),
            Payload(
                PayloadType.NOTIFY,
                NotifyPayload(
                    Notify.NAT_DETECTION_SOURCE_IP, nat_hash(self.spi_i, zero, self.local)
                ),
            ),
            Payload(
                PayloadType.NOTIFY,
                NotifyPayload(
                    Notify.NAT_DETECTION_DESTINATION_IP, nat_hash(self.spi_i, zero, self.remote)
                ),
            ),
        ]
        ctx["cookie"] = cookie
        data = wire.encode(
            spi_i=self.spi_i,
            spi_r=zero,
            exchange=ExchangeType.IKE_SA_INIT,
            flags=wire.FLAG_INITIATOR,
            message_id=0,
            payloads=payloads,
        )
        self.init_request = data
        self.our_next = 1
        self._start("init", ExchangeType.IKE_SA_INIT, 0, data, now, {})

    def _fail(self, notify: str) -> None:
        self._emit(NegotiationFailed(self.remote, self.tunnel_id, notify, False))
        self.engine.discard(self, "failed")

    def on_init_response(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        ctx = self.auth_ctx
        assert self.tunnel is not None and self.kex is not None
        cookie = msg.notify(Notify.COOKIE)
        if cookie is not None:
            ctx["cookie_tries"] = ctx.get("cookie_tries", 0) + 1
            if ctx["cookie_tries"] > 3:
                self._fail("COOKIE")
                return
            self.send_init(now, cookie.data)  # §2.6: same message with the cookie first
            return
        err = self._error_notify(msg)
        if err is not None:
            if err.type == Notify.INVALID_KE_PAYLOAD and len(err.data) == 2:
                group = int.from_bytes(err.data, "big")
                offered = {s.dh for s in ctx["ike_suites"]}
                if group in offered and group != self.kex.group and not ctx.get("ke_retried"):
                    ctx["ke_retried"] = True
                    self.kex = dhmod.generate(group)  # §1.2: retry with the wanted group
                    self.send_init(now, ctx.get("cookie"))
                    return
            self._fail(notify_name(err.type))
            return
        sa, ke, nonce = msg.get(PayloadType.SA), msg.get(PayloadType.KE), msg.get(PayloadType.NONCE)
        if not (
            isinstance(sa, SaPayload)
            and isinstance(ke, KePayload)
            and isinstance(nonce, NoncePayload)
            and len(sa.proposals) == 1
        ):
            self._fail("INVALID_SYNTAX")
            return
        try:
            _, suite = select_ike(sa)
            if suite.dh != self.kex.group:
                raise NoProposalChosen
            g_ir = self.kex.shared(ke.data)
        except (NoProposalChosen, dhmod.DhError):
            self._fail("NO_PROPOSAL_CHOSEN")
            return
        self.spi_r = msg.header.spi_r
        self.nr = nonce.nonce
        self.init_response = msg.raw
        self.derive_initial_keys(suite, g_ir)
        # §2.23: compare the responder's NAT_DETECTION hashes with what we see.
        src = [n.data for n in msg.notifies() if n.type == Notify.NAT_DETECTION_SOURCE_IP]
        dst = [n.data for n in msg.notifies() if n.type == Notify.NAT_DETECTION_DESTINATION_IP]
        if src or dst:
            peer_ok = nat_hash(self.spi_i, self.spi_r, self.remote) in src
            we_ok = nat_hash(self.spi_i, self.spi_r, self.local) in dst
            self.nat_detected = not (peer_ok and we_ok)
        if self.nat_detected and self.local[1] == 500:
            # §2.23: after NAT detection, move to 4500 for IKE_AUTH and beyond.
            self.local = (self.local[0], 4500)
            self.remote = (self.remote[0], 4500)
        self.udp_encap = self.nat_detected or self.local[1] == 4500
        self._send_auth(now)

    def _send_auth(self, now: float) -> None:
        """§1.2 message 3: IDi, [N(INITIAL_CONTACT)], AUTH, SAi2, TSi, TSr."""
        assert self.tunnel is not None and self.prf is not None and self.keys is not None
        ctx = self.auth_ctx
        idi = self.engine.make_identity(self.tunnel, ctx["id_kind"], self.local[0])
        auth = psk_auth(
            self.prf,
            self.tunnel.psk,
            signed_octets(self.prf, self.init_request, self.nr, self.keys.sk_pi, idi.body),
        )
        spi_in = self.engine.allocate_spi()
        ctx["spi_in"] = spi_in
        payloads: list[Payload] = [Payload(PayloadType.IDI, idi)]
        if ctx.get("initial_contact"):
            payloads.append(Payload(PayloadType.NOTIFY, NotifyPayload(Notify.INITIAL_CONTACT)))
        payloads += ctx.get("extra", {}).get("auth", [])
        payloads += [
            Payload(PayloadType.AUTH, AuthPayload(AuthMethod.PSK, auth)),
            Payload(
                PayloadType.SA,
                child_offer(ctx["child_suites"], spi_in.to_bytes(4, "big"), with_dh=False),
            ),
            Payload(PayloadType.TSI, TsPayload([_to_selector(t) for t in self.tunnel.local_ts])),
            Payload(PayloadType.TSR, TsPayload([_to_selector(t) for t in self.tunnel.remote_ts])),
        ]
        self.state = IkeState.AUTH_SENT
        data = self._encode(ExchangeType.IKE_AUTH, 1, payloads, response=False)
        self.our_next = 2
        self._start("auth", ExchangeType.IKE_AUTH, 1, data, now, {})

    def on_auth_response(self, msg: wire.Message, req: OutRequest, now: float) -> None:
        assert self.tunnel is not None and self.prf is not None and self.keys is not None
        ctx = self.auth_ctx
        idr, auth = msg.get(PayloadType.IDR), msg.get(PayloadType.AUTH)
        err = self._error_notify(msg)
        if not isinstance(idr, IdPayload) or not isinstance(auth, AuthPayload):
            self.engine.release_spi(ctx["spi_in"])
            if err is not None and err.type == Notify.AUTHENTICATION_FAILED:
                self._emit(AuthenticationFailed(self.remote, "peer_refused", None))
                self.engine.discard(self, "auth_failed")
            else:
                self._fail(notify_name(err.type) if err else "INVALID_SYNTAX")
            return
        expected = psk_auth(
            self.prf,
            self.tunnel.psk,
            signed_octets(self.prf, self.init_response, self.ni, self.keys.sk_pr, idr.body),
        )
        if auth.method != AuthMethod.PSK or not compare_digest(expected, auth.data):
            self.engine.release_spi(ctx["spi_in"])
            self._emit(AuthenticationFailed(self.remote, "bad_auth", id_text(idr)))
            self.engine.discard(self, "auth_failed")
            return
        self.id_kind = ctx["id_kind"]
        ni, nr = self.ni, self.nr
        self._established(now)
        sa, tsi, tsr = msg.get(PayloadType.SA), msg.get(PayloadType.TSI), msg.get(PayloadType.TSR)
        done = False
        if isinstance(sa, SaPayload) and isinstance(tsi, TsPayload) and isinstance(tsr, TsPayload):
            try:
                proposal, suite = select_child(sa, allow_null=True, pfs=False)
                ts_local = narrow(tsi.selectors, self.tunnel.local_ts)
                ts_remote = narrow(tsr.selectors, self.tunnel.remote_ts)
                if not ts_local or not ts_remote:
                    raise NoProposalChosen
                keys = child_keymat(
                    self.prf,
                    self.keys.sk_d,
                    ni,
                    nr,
                    enc_len=suite.enc_key_len,
                    integ_len=suite.integ_key_len,
                )
                self.make_child(
                    suite=suite,
                    spi_in=ctx["spi_in"],
                    spi_out=int.from_bytes(proposal.spi, "big"),
                    keys=keys,
                    we_initiated_exchange=True,
                    ts_local=ts_local,
                    ts_remote=ts_remote,
                    now=now,
                )
                done = True
            except NoProposalChosen:
                pass
        if not done:
            self.engine.release_spi(ctx["spi_in"])
            name = notify_name(err.type) if err else "NO_PROPOSAL_CHOSEN"
            self._emit(NegotiationFailed(self.remote, self.tunnel_id, name, False))
        self._forget_handshake()


__all__ = ["ChildSa", "IkeSa", "OutRequest", "Proposal", "narrow", "nat_hash"]
