"""What the IKE core tells its owner, pulled with ``IkeEngine.next_event()``.

Frozen, slotted dataclasses (STYLE: aioquic/h11 events). The control glue turns
them into replication records: ``ChildSaInstalled`` → two ``set``s,
``ChildSaUpdated`` → two ``set``s of the same keys, ``ChildSaDeleted`` → one
tombstone per key in ``sa_keys``. Nothing here carries a PSK; ``SaRecord``
hides its keys in its repr.
"""

from __future__ import annotations

from dataclasses import dataclass

from replication.records import SaRecord

Address = tuple[str, int]
"""(IP address string, UDP port)."""


@dataclass(frozen=True, slots=True)
class IkeSaEstablished:
    """IKE_AUTH completed (RFC 7296 §1.2): the peer proved the tunnel's PSK."""

    tunnel_id: str
    account_id: str
    spi_i: int
    """Initiator's IKE SPI (8 octets as an int)."""
    spi_r: int
    """Responder's IKE SPI."""
    initiator: bool
    """True if we started this IKE SA (only our test/bench initiator does)."""
    local: Address
    remote: Address
    """The peer's current address and port (after NAT, if any)."""
    nat_detected: bool
    """RFC 7296 §2.23: the peer's NAT_DETECTION_SOURCE_IP did not match."""
    udp_encap: bool
    """ESP goes in UDP 4500 (NAT detected or the peer started on 4500)."""
    id_type: str
    """How the peer named itself: ``rfc822``, ``fqdn``, ``key_id`` or ``ipv4``."""
    proposal: str
    """Chosen IKE transforms in strongSwan's notation, e.g. ``aes256gcm16-prfsha384-ecp384``."""


@dataclass(frozen=True, slots=True)
class IkeSaRekeyed:
    """RFC 7296 §2.18: the IKE SA was replaced; Child SAs moved to the new one."""

    tunnel_id: str
    account_id: str
    old_spi_i: int
    old_spi_r: int
    spi_i: int
    spi_r: int
    proposal: str


@dataclass(frozen=True, slots=True)
class IkeSaDeleted:
    """The IKE SA is gone. Its Child SAs were reported deleted just before."""

    tunnel_id: str
    account_id: str
    spi_i: int
    spi_r: int
    reason: str
    """Bounded label: ``peer_delete``, ``local_delete``, ``dpd``, ``timeout``,
    ``initial_contact``, ``rekeyed``, ``expired``."""


@dataclass(frozen=True, slots=True)
class ChildSaInstalled:
    """A Child SA pair to publish: ``inbound`` uses OUR SPI, ``outbound`` the peer's.

    Make-before-break: when ``replaces`` is set (a rekey), the old pair stays
    valid until a later ``ChildSaDeleted`` for it.
    """

    tunnel_id: str
    account_id: str
    inbound: SaRecord
    outbound: SaRecord
    replaces: tuple[int, int] | None
    """(old inbound SPI, old outbound SPI) of the Child SA this one rekeys."""
    hold_outbound: bool = False
    """Publish ``inbound`` only: a rekey the PEER started, whose outbound SA
    waits until the peer deletes the old one (a later :class:`ChildSaUpdated`
    without the hold). Store both."""


@dataclass(frozen=True, slots=True)
class ChildSaUpdated:
    """The peer moved (NAT rebinding, 500→4500 float): same SPIs and keys,
    new ``remote_addr``/``remote_port``/``udp_encap``. Re-publish both records
    (``inbound`` only while ``hold_outbound``). Also the release of a held
    outbound SA (:attr:`ChildSaInstalled.hold_outbound`)."""

    tunnel_id: str
    account_id: str
    inbound: SaRecord
    outbound: SaRecord
    hold_outbound: bool = False


@dataclass(frozen=True, slots=True)
class ChildSaDeleted:
    """A Child SA pair to tombstone (``sa_keys`` are the record keys)."""

    tunnel_id: str
    account_id: str
    inbound_spi: int
    outbound_spi: int
    sa_keys: tuple[str, ...]
    reason: str
    """Bounded label, as for :class:`IkeSaDeleted`, plus ``rekeyed``."""


@dataclass(frozen=True, slots=True)
class AuthenticationFailed:
    """IKE_AUTH refused (unknown identity or wrong PSK); no state was kept.

    ``reason`` is ``unknown_id`` or ``bad_auth`` (or, on our initiator side,
    ``peer_refused``); ``identity`` is the peer's IDi as text (not secret).
    """

    remote: Address
    reason: str
    identity: str | None


@dataclass(frozen=True, slots=True)
class NegotiationFailed:
    """A handshake or Child SA negotiation ended with an error notify.

    ``notify`` is the RFC 7296 §3.10.1 name, e.g. ``NO_PROPOSAL_CHOSEN``,
    ``TS_UNACCEPTABLE``; ``sent`` says whether we sent it or received it.
    """

    remote: Address
    tunnel_id: str | None
    notify: str
    sent: bool


IkeEvent = (
    IkeSaEstablished
    | IkeSaRekeyed
    | IkeSaDeleted
    | ChildSaInstalled
    | ChildSaUpdated
    | ChildSaDeleted
    | AuthenticationFailed
    | NegotiationFailed
)
