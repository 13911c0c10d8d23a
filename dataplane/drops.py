"""Why a packet was dropped: one enum shared by every codec and the worker.

Codecs never log per packet (DESIGN §7). They raise :class:`Drop` carrying a
:class:`DropReason`; the worker's loop counts reasons in local ints and flushes
them to ``anywan_worker_drops_total{reason=...}``. The enum's string value is
that label, so the label set is bounded by construction.
"""

from __future__ import annotations

from enum import StrEnum


class DropReason(StrEnum):
    """Every reason a packet can be refused; the value is the metric label."""

    MALFORMED = "malformed"
    """Too short, inconsistent lengths, truncated options: not parseable."""
    BAD_ICV = "bad_icv"
    """ESP integrity check (or GCM tag) failed: wrong key or tampered."""
    BAD_PAD = "bad_pad"
    """ESP padding bytes or pad length wrong after decryption (RFC 4303 §2.4)."""
    REPLAY = "replay"
    """Sequence number already seen or left of the window (RFC 4303 §3.4.3)."""
    UNKNOWN_SPI = "unknown_spi"
    """No inbound SA with this SPI on this worker."""
    UNKNOWN_NEXT_HEADER = "unknown_next_header"
    """Inner protocol is neither IPv4 (4) nor IPv6 (41) in tunnel mode."""
    DUMMY = "dummy"
    """Next header 59: a traffic-flow-confidentiality dummy (RFC 4303 §2.6)."""
    KEEPALIVE = "keepalive"
    """NAT keepalive, a single 0xFF on UDP 4500 (RFC 3948 §2.3)."""
    BAD_CHECKSUM = "bad_checksum"
    """GRE (RFC 2784 §2.5) or IP header checksum did not verify."""
    BAD_VERSION = "bad_version"
    """GRE version ≠ 0 or reserved bits set (RFC 2784 §2.3), IP version wrong."""
    UNSUPPORTED = "unsupported"
    """Well-formed but outside our scope (e.g. GRE routing bit, ESN)."""
    NO_TUNNEL = "no_tunnel"
    """GRE packet whose outer address pair matches no tunnel."""
    SELECTOR = "selector"
    """Inner packet outside the SA's traffic selectors (RFC 4301 §5.2)."""
    CROSS_ACCOUNT = "cross_account"
    """Packet would leave its account's virtual network."""
    NO_ROUTE = "no_route"
    """Outbound: no static route covers the destination."""
    NO_SA = "no_sa"
    """Outbound: the route's tunnel has no usable outbound Child SA."""
    MTU = "mtu"
    """Does not fit the tunnel MTU with DF set; ICMP sent back instead."""
    ECN = "ecn"
    """RFC 6040 §4.2: outer CE over a Not-ECT inner packet must be dropped."""
    TTL = "ttl"
    """Inner TTL / hop limit expired."""
    SEQ_EXHAUSTED = "seq_exhausted"
    """Outbound sequence space of this worker used up; the SA must rekey."""


class Drop(Exception):
    """A packet refused for a countable reason. Cheap: no message formatting.

    ``detail`` is for tests and debug tooling only; the hot path reads
    ``reason`` and never formats the exception.
    """

    __slots__ = ("detail", "reason")

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value
