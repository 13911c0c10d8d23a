"""Our algorithm preferences (DESIGN §3, the seeds) and proposal selection.

RFC 7296 §2.7 / §3.3.6: the responder picks ONE proposal from the peer's list
and, in it, one transform of each type; it answers with exactly those. We pick
by OUR preference order (the peer's order breaks ties), so the outcome does
not depend on how a vendor sorts its list. Nothing acceptable →
:class:`NoProposalChosen` (``NO_PROPOSAL_CHOSEN``).

=========  ==================================================  ====================
           IKE SA                                              Child SA (ESP)
=========  ==================================================  ====================
encr       AES-GCM-16-128, AES-GCM-16-256, AES-CBC-256          AES-GCM-16-128/256,
                                                               AES-CBC-128/256, NULL*
integ      HMAC-SHA2-256-128 (CBC only)                        HMAC-SHA2-256-128,
                                                               HMAC-SHA1-96 (not GCM)
prf        HMAC-SHA2-256, -384, -512                           —
DH         20 (ECP-384), 14 (MODP-2048), 5 (MODP-1536)          PFS 14, 5, or none
ESN        —                                                   no ESN only
=========  ==================================================  ====================

\\* NULL only on tunnels that opt in (``allow_null_cipher``).
"""

from __future__ import annotations

from dataclasses import dataclass

from control.ike.crypto import (
    ENCR_AES_CBC,
    ENCR_AES_GCM_16,
    ENCR_NULL,
    INTEG_HMAC_SHA1_96,
    INTEG_HMAC_SHA2_256_128,
    PRF_HMAC_SHA2_256,
    PRF_HMAC_SHA2_384,
    PRF_HMAC_SHA2_512,
)
from control.ike.payloads import Proposal, Protocol, SaPayload, Transform, TransformType
from replication.records import Cipher, Integ

INTEG_NONE = 0
DH_NONE = 0
ESN_NO = 0


class NoProposalChosen(Exception):
    """No proposal of the peer's fits our table."""


@dataclass(frozen=True, slots=True)
class IkeSuite:
    encr: int
    key_bits: int
    integ: int | None
    prf: int
    dh: int

    @property
    def enc_key_len(self) -> int:
        """SK_e length: key plus the 4-octet salt for GCM (RFC 5282 §7.1)."""
        return self.key_bits // 8 + (4 if self.encr == ENCR_AES_GCM_16 else 0)

    @property
    def integ_key_len(self) -> int:
        return 32 if self.integ == INTEG_HMAC_SHA2_256_128 else 0

    @property
    def name(self) -> str:
        parts = [_encr_name(self.encr, self.key_bits)]
        if self.integ:
            parts.append(_INTEG_NAMES[self.integ])
        parts.append("prf" + _PRF_NAMES[self.prf])
        parts.append(_DH_NAMES[self.dh])
        return "-".join(parts)

    def transforms(self) -> list[Transform]:
        out = [Transform(TransformType.ENCR, self.encr, self.key_bits)]
        out.append(Transform(TransformType.PRF, self.prf))
        if self.integ:
            out.append(Transform(TransformType.INTEG, self.integ))
        out.append(Transform(TransformType.DH, self.dh))
        return out


@dataclass(frozen=True, slots=True)
class ChildSuite:
    encr: int
    key_bits: int
    integ: int | None
    dh: int | None
    """PFS group, or None."""

    @property
    def cipher(self) -> Cipher:
        if self.encr == ENCR_AES_GCM_16:
            return Cipher.AES128GCM16 if self.key_bits == 128 else Cipher.AES256GCM16
        if self.encr == ENCR_AES_CBC:
            return Cipher.AES128CBC if self.key_bits == 128 else Cipher.AES256CBC
        return Cipher.NULL

    @property
    def integ_alg(self) -> Integ:
        if self.integ == INTEG_HMAC_SHA2_256_128:
            return Integ.SHA256_128
        if self.integ == INTEG_HMAC_SHA1_96:
            return Integ.SHA1_96
        return Integ.NONE

    @property
    def enc_key_len(self) -> int:
        """KEYMAT octets for encryption: key plus the GCM salt (RFC 4106 §8.1)."""
        return self.key_bits // 8 + (4 if self.encr == ENCR_AES_GCM_16 else 0)

    @property
    def integ_key_len(self) -> int:
        return {INTEG_HMAC_SHA2_256_128: 32, INTEG_HMAC_SHA1_96: 20}.get(self.integ or 0, 0)

    @property
    def name(self) -> str:
        parts = [_encr_name(self.encr, self.key_bits)]
        if self.integ:
            parts.append(_INTEG_NAMES[self.integ])
        if self.dh:
            parts.append(_DH_NAMES[self.dh])
        return "-".join(parts)

    def transforms(self, *, with_dh: bool = True) -> list[Transform]:
        out = [Transform(TransformType.ENCR, self.encr, self.key_bits or None)]
        if self.integ:
            out.append(Transform(TransformType.INTEG, self.integ))
        if with_dh and self.dh:
            out.append(Transform(TransformType.DH, self.dh))
        out.append(Transform(TransformType.ESN, ESN_NO))
        return out


def _encr_name(encr: int, bits: int) -> str:
    if encr == ENCR_AES_GCM_16:
        return f"aes{bits}gcm16"
    if encr == ENCR_AES_CBC:
        return f"aes{bits}"
    return "null"


_INTEG_NAMES = {INTEG_HMAC_SHA2_256_128: "sha256", INTEG_HMAC_SHA1_96: "sha1"}
_PRF_NAMES = {PRF_HMAC_SHA2_256: "sha256", PRF_HMAC_SHA2_384: "sha384", PRF_HMAC_SHA2_512: "sha512"}
_DH_NAMES = {20: "ecp384", 14: "modp2048", 5: "modp1536"}

# ------------------------------------------------------------------ our tables

IKE_ENCR: list[tuple[int, int, int | None]] = [
    (ENCR_AES_GCM_16, 128, None),
    (ENCR_AES_GCM_16, 256, None),
    (ENCR_AES_CBC, 256, INTEG_HMAC_SHA2_256_128),
]
IKE_PRF: list[int] = [PRF_HMAC_SHA2_256, PRF_HMAC_SHA2_384, PRF_HMAC_SHA2_512]
IKE_DH: list[int] = [20, 14, 5]

CHILD_ENCR: list[tuple[int, int, int | None]] = [
    (ENCR_AES_GCM_16, 128, None),
    (ENCR_AES_GCM_16, 256, None),
    (ENCR_AES_CBC, 128, INTEG_HMAC_SHA2_256_128),
    (ENCR_AES_CBC, 256, INTEG_HMAC_SHA2_256_128),
    (ENCR_AES_CBC, 128, INTEG_HMAC_SHA1_96),
    (ENCR_AES_CBC, 256, INTEG_HMAC_SHA1_96),
]
CHILD_NULL: list[tuple[int, int, int | None]] = [
    (ENCR_NULL, 0, INTEG_HMAC_SHA2_256_128),
    (ENCR_NULL, 0, INTEG_HMAC_SHA1_96),
]
CHILD_DH: list[int | None] = [14, 5, None]

ALL_IKE_SUITES: list[IkeSuite] = [
    IkeSuite(e, k, i, p, d) for (e, k, i) in IKE_ENCR for d in IKE_DH for p in IKE_PRF
]
"""Every IKE combination we accept, in preference order (27 of them)."""

ALL_CHILD_SUITES: list[ChildSuite] = [
    ChildSuite(e, k, i, d) for (e, k, i) in CHILD_ENCR + CHILD_NULL for d in CHILD_DH
]
"""Every Child combination (with NULL, which needs the tunnel's opt-in)."""

CHILD_SUITES_NO_PFS: list[ChildSuite] = [
    s for s in ALL_CHILD_SUITES if s.dh is None and s.encr != ENCR_NULL
]
"""One per encryption/integrity pair, no PFS: what an IKE_AUTH offer needs."""


# ------------------------------------------------------------------ selection


class _Offer:
    """One peer proposal, indexed by transform type."""

    __slots__ = ("by_type", "proposal")

    def __init__(self, proposal: Proposal) -> None:
        self.proposal = proposal
        self.by_type: dict[int, set[tuple[int, int | None]]] = {}
        for t in proposal.transforms:
            self.by_type.setdefault(t.type, set()).add((t.id, t.key_length))

    def has(self, ttype: int, tid: int, key_length: int | None = None) -> bool:
        return (tid, key_length) in self.by_type.get(ttype, ())

    def ids(self, ttype: int) -> set[int]:
        return {tid for tid, _ in self.by_type.get(ttype, ())}

    def encr_ok(self, encr: int, bits: int, integ: int | None) -> bool:
        if encr == ENCR_NULL:
            if not self.has(TransformType.ENCR, ENCR_NULL):
                return False
        elif not self.has(TransformType.ENCR, encr, bits):
            return False
        integs = self.ids(TransformType.INTEG)
        if integ is None:
            # RFC 5282 §8: an AEAD proposal carries no integrity (or only NONE).
            return not (integs - {INTEG_NONE})
        return integ in integs


def select_ike(sa: SaPayload) -> tuple[Proposal, IkeSuite]:
    """Pick the IKE proposal (§2.7) by our table; NoProposalChosen otherwise."""
    offers = [_Offer(p) for p in sa.proposals if p.protocol == Protocol.IKE]
    for encr, bits, integ in IKE_ENCR:
        for dh in IKE_DH:
            for prf in IKE_PRF:
                for o in offers:
                    if (
                        o.encr_ok(encr, bits, integ)
                        and o.has(TransformType.PRF, prf)
                        and o.has(TransformType.DH, dh)
                    ):
                        return o.proposal, IkeSuite(encr, bits, integ, prf, dh)
    raise NoProposalChosen


def ike_groups_offered(sa: SaPayload) -> list[int]:
    """DH groups the peer offers that we accept, in our order."""
    offered: set[int] = set()
    for p in sa.proposals:
        offered |= {t.id for t in p.transforms if t.type == TransformType.DH}
    return [g for g in IKE_DH if g in offered]


def select_child(sa: SaPayload, *, allow_null: bool, pfs: bool) -> tuple[Proposal, ChildSuite]:
    """Pick the ESP proposal. ``pfs`` False (IKE_AUTH, §1.2) ignores DH transforms."""
    # RFC 4303 §2.1: SPIs 0-255 are reserved; such a proposal is unusable.
    offers = [
        _Offer(p)
        for p in sa.proposals
        if p.protocol == Protocol.ESP and len(p.spi) == 4 and int.from_bytes(p.spi, "big") >= 256
    ]
    encrs = CHILD_ENCR + (CHILD_NULL if allow_null else [])
    for encr, bits, integ in encrs:
        for dh in CHILD_DH if pfs else [None]:
            for o in offers:
                if not o.encr_ok(encr, bits, integ):
                    continue
                esn = o.ids(TransformType.ESN)
                if esn and ESN_NO not in esn:
                    continue  # ESN is never negotiated (DESIGN §3)
                if pfs:
                    groups = o.ids(TransformType.DH)
                    if dh is None:
                        if groups and DH_NONE not in groups:
                            continue
                    elif dh not in groups:
                        continue
                return o.proposal, ChildSuite(encr, bits, integ, dh)
    raise NoProposalChosen


def ike_sa_payload(suite: IkeSuite, num: int = 1, spi: bytes = b"") -> SaPayload:
    """The single-proposal SA we answer with (or offer when rekeying, with ``spi``)."""
    return SaPayload([Proposal(num, Protocol.IKE, spi, suite.transforms())])


def child_sa_payload(suite: ChildSuite, spi: bytes, num: int = 1) -> SaPayload:
    return SaPayload([Proposal(num, Protocol.ESP, spi, suite.transforms())])


def ike_offer(suites: list[IkeSuite], spi: bytes = b"") -> SaPayload:
    """An initiator's offer: one proposal per suite (used by our initiator)."""
    return SaPayload(
        [Proposal(i + 1, Protocol.IKE, spi, s.transforms()) for i, s in enumerate(suites)]
    )


def child_offer(suites: list[ChildSuite], spi: bytes, *, with_dh: bool = True) -> SaPayload:
    return SaPayload(
        [
            Proposal(i + 1, Protocol.ESP, spi, s.transforms(with_dh=with_dh))
            for i, s in enumerate(suites)
        ]
    )
