"""The (state, exchange) tables and the proposal tables, alone."""

from __future__ import annotations

import pytest

from control.ike.connection import IkeSa
from control.ike.payloads import ExchangeType, Proposal, Protocol, SaPayload, Transform
from control.ike.proposals import (
    ALL_CHILD_SUITES,
    ALL_IKE_SUITES,
    NoProposalChosen,
    ike_offer,
    select_child,
    select_ike,
)
from control.ike.state import REQUESTS, RESPONSES, IkeState


def test_every_table_entry_names_a_handler() -> None:
    for table in (REQUESTS, RESPONSES):
        for (state, exchange), name in table.items():
            assert isinstance(state, IkeState) and isinstance(exchange, ExchangeType)
            assert callable(getattr(IkeSa, name)), name


def test_nothing_accepted_before_keys_or_after_close() -> None:
    for state in (IkeState.INIT_SENT, IkeState.AUTH_SENT, IkeState.CLOSED):
        assert not [k for k in REQUESTS if k[0] is state]
    assert (IkeState.HALF_OPEN, ExchangeType.CREATE_CHILD_SA) not in REQUESTS
    assert (IkeState.HALF_OPEN, ExchangeType.INFORMATIONAL) not in REQUESTS
    assert not [k for k in RESPONSES if k[0] in (IkeState.HALF_OPEN, IkeState.CLOSED)]


def test_ike_matrix_is_the_seeds() -> None:
    names = {s.name for s in ALL_IKE_SUITES}
    assert len(names) == 27
    assert "aes256-sha256-prfsha512-modp1536" in names
    assert "aes128gcm16-prfsha384-ecp384" in names


def test_select_ike_by_our_order_and_key_length() -> None:
    cbc128 = Proposal(
        1,
        Protocol.IKE,
        b"",
        [Transform(1, 12, 128), Transform(2, 5), Transform(3, 12), Transform(4, 14)],
    )
    with pytest.raises(NoProposalChosen):
        select_ike(SaPayload([cbc128]))
    offer = ike_offer(list(reversed(ALL_IKE_SUITES)))
    prop, suite = select_ike(offer)
    assert suite == ALL_IKE_SUITES[0] and prop.num == len(ALL_IKE_SUITES)
    # an unknown attribute spoils that transform only (§3.3.6)
    weird = Proposal(
        1,
        Protocol.IKE,
        b"",
        [Transform(0x101, 20, 128), Transform(1, 20, 256), Transform(2, 5), Transform(4, 20)],
    )
    assert select_ike(SaPayload([weird]))[1].key_bits == 256


def test_select_child_esn_null_and_pfs() -> None:
    def esp(*ts: Transform) -> SaPayload:
        return SaPayload([Proposal(1, Protocol.ESP, b"\x00\x00\x10\x00", list(ts))])

    gcm = Transform(1, 20, 128)
    with pytest.raises(NoProposalChosen):  # ESN only "yes"
        select_child(esp(gcm, Transform(5, 1)), allow_null=False, pfs=False)
    assert select_child(esp(gcm, Transform(5, 0), Transform(5, 1)), allow_null=False, pfs=False)
    null = esp(Transform(1, 11), Transform(3, 2), Transform(5, 0))
    with pytest.raises(NoProposalChosen):
        select_child(null, allow_null=False, pfs=False)
    assert select_child(null, allow_null=True, pfs=False)[1].cipher.value == "null"
    pfs = esp(gcm, Transform(4, 5), Transform(4, 14), Transform(5, 0))
    assert select_child(pfs, allow_null=False, pfs=True)[1].dh == 14
    assert select_child(pfs, allow_null=False, pfs=False)[1].dh is None  # IKE_AUTH ignores DH
    with pytest.raises(NoProposalChosen):  # group 20 is not a PFS group of ours (DESIGN §3)
        select_child(esp(gcm, Transform(4, 20), Transform(5, 0)), allow_null=False, pfs=True)
    assert len(ALL_CHILD_SUITES) == 24


def test_reserved_esp_spi_is_not_selectable() -> None:
    """RFC 4303 §2.1: SPI 1-255 reserved (a soak run found one crash a record check)."""
    for spi in (b"\x00\x00\x00\x00", b"\x00\x00\x00\xff"):
        sa = SaPayload([Proposal(1, Protocol.ESP, spi, [Transform(1, 20, 128), Transform(5, 0)])])
        with pytest.raises(NoProposalChosen):
            select_child(sa, allow_null=False, pfs=False)
