"""All IKE SAs of one control node, sans-IO (STYLE: aioquic's ``QuicConnection``).

The engine owns no socket and reads no clock. In: ``receive_datagram(data,
local, remote, now)`` and ``handle_timer(now)``. Out, pulled by the caller:
``datagrams_to_send()``, ``get_timer()`` (absolute deadline or None) and
``next_event()`` (see :mod:`control.ike.events`). ``transport.py`` is the thin
asyncio shell around it.

Datagrams are IKE messages WITHOUT the RFC 3948 non-ESP marker; the port in
``local`` (500 or 4500) says where they arrived and where replies leave from.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

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
    rekey_delete_delay: float = 2.0
    """Make-before-break: after a rekey we started, the old Child SA is deleted
    this long after the new one was announced, giving the bus time to apply it."""
    replay_window: int = 1024
    """Anti-replay window put in SA records of tunnels with replay protection."""
    unix_time_offset: float = 0.0
    """Added to ``now`` for the Unix times in SaRecords (created, rekey_at, …);
    the transport sets ``time.time() - time.monotonic()`` when ``now`` is monotonic."""
    nat_keepalive: bool = False
    """Reserved; NAT keepalives are the peer's job behind its NAT (RFC 3948 §4)."""


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


class IkeEngine:
    """Every IKE SA of this node, both roles.

    Responder for customers; initiator for rekeys/DPD/deletes of SAs it holds,
    and (``initiate``) for a whole IKE SA — used by the tests and the benchmark.
    """

    def __init__(self, config: IkeConfig, lookup: Lookup, *, rng: Rng | None = None) -> None:
        """``lookup`` maps a peer identity to its tunnel (None = unknown).
        ``rng(n)`` returns n random bytes; injected so tests can be reproducible."""
        self.config = config
        self.lookup = lookup
        self.rng: Rng = rng if rng is not None else secrets.token_bytes

    def receive_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        """Feed one IKE message (without non-ESP marker). Never raises on bad input."""
        raise NotImplementedError

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]:
        """(data, local, remote) to send now; data without non-ESP marker."""
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """The next absolute deadline (retransmit, DPD, rekey, expiry), or None."""
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        """Run everything due at ``now``."""
        raise NotImplementedError

    def next_event(self) -> object | None:
        """The next :mod:`control.ike.events` event, or None."""
        raise NotImplementedError

    def delete_tunnel(self, tunnel_id: str, now: float) -> None:
        """Delete every IKE SA of the tunnel: DELETE to the peer, events out now."""
        raise NotImplementedError
