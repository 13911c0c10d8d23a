"""RFC 7296 §2.8.2: both sides rekey the IKE SA at once.

Each side answers the other's rekey as usual; once both exchanges are done,
the new IKE SA made with the lowest of the four nonces is redundant and deleted
by its creator, the other inherits the Child SAs, and its creator deletes the
old IKE SA. Both sides end on the same single IKE SA at once — no
TEMPORARY_FAILURE, no retry a minute later, no Child SA touched.
"""

from __future__ import annotations

import random

from control.ike import events as ev
from control.ike.engine import IkeConfig, IkeEngine
from control.ike.messages import decode
from control.ike.payloads import ExchangeType

from .pair import TUNNEL, Pair, make_lookup, server_tunnel

GRACE = IkeConfig().old_ike_sa_grace
QUIET = dict(strict=True, dpd_interval=1e6, ike_lifetime=1e7, child_lifetime=1e7)


def _pair(seed: int) -> Pair:
    rs, rc = random.Random(seed), random.Random(seed + 10_000)
    server = IkeEngine(IkeConfig(**QUIET), make_lookup([server_tunnel()]), rng=rs.randbytes)  # type: ignore[arg-type]
    client = IkeEngine(IkeConfig(**QUIET), lambda ident: None, rng=rc.randbytes)  # type: ignore[arg-type]
    p = Pair(client, server)
    p.connect()
    assert p.events(ev.ChildSaInstalled) and p.events(ev.ChildSaInstalled, "client")
    return p


def _spis(sa) -> tuple[int, int]:
    return int.from_bytes(sa.spi_i, "big"), int.from_bytes(sa.spi_r, "big")


def _as_the_service_sees_it(p: Pair, side: str) -> set[tuple[int, int]]:
    """IKE SAs tracked from events alone, like control/service.py does."""
    known: set[tuple[int, int]] = set()
    for e in p.server_events if side == "server" else p.client_events:
        if isinstance(e, ev.IkeSaEstablished):
            known.add((e.spi_i, e.spi_r))
        elif isinstance(e, ev.IkeSaRekeyed):
            known.discard((e.old_spi_i, e.old_spi_r))
            known.add((e.spi_i, e.spi_r))
        elif isinstance(e, ev.IkeSaDeleted):
            known.discard((e.spi_i, e.spi_r))
    return known


def _assert_converged(p: Pair, children: dict[str, set[int]]) -> tuple[int, int]:
    (s_sa,) = p.server.ike_sas(TUNNEL)
    (c_sa,) = p.client.ike_sas(TUNNEL)
    assert _spis(s_sa) == _spis(c_sa)
    assert len(p.server.sas) == 1 and len(p.client.sas) == 1  # nothing left behind
    assert set(s_sa.children) == children["server"] and set(c_sa.children) == children["client"]
    for side in ("server", "client"):
        assert not p.events(ev.ChildSaDeleted, side) and not p.events(ev.IkeSaDeleted, side)
        assert len(p.events(ev.ChildSaInstalled, side)) == 1
        assert not p.events(ev.NegotiationFailed, side)
        assert _as_the_service_sees_it(p, side) == {_spis(s_sa)}
    # the surviving IKE SA works: DPD, and a Child SA rekey both ways
    assert p.client.send_dpd(TUNNEL, p.now) and p.server.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    s_new, c_new = p.events(ev.ChildSaInstalled)[-1], p.events(ev.ChildSaInstalled, "client")[-1]
    assert s_new.inbound.spi == c_new.outbound.spi and s_new.outbound.spi == c_new.inbound.spi
    assert s_new.inbound.enc_key == c_new.outbound.enc_key
    assert not p.server.drops["unknown_spi"] and not p.client.drops["unknown_spi"]
    return _spis(s_sa)


def _children(p: Pair) -> dict[str, set[int]]:
    return {
        "server": set(p.server.ike_sas(TUNNEL)[0].children),
        "client": set(p.client.ike_sas(TUNNEL)[0].children),
    }


def test_both_detect_lowest_nonce_decides_and_both_end_on_one_ike_sa() -> None:
    winners: set[str] = set()
    for seed in range(16):
        p = _pair(seed)
        kids = _children(p)
        assert p.client.rekey_ike(TUNNEL, p.now) and p.server.rekey_ike(TUNNEL, p.now)
        p.roundtrip()
        for eng in (p.client, p.server):
            assert eng.drops["ike_rekey_collision"] == 1
        won = {
            side
            for side, eng in (("client", p.client), ("server", p.server))
            if eng.drops["ike_rekey_collision_won"]
        }
        lost = {
            side
            for side, eng in (("client", p.client), ("server", p.server))
            if eng.drops["ike_rekey_collision_lost"]
        }
        assert len(won) == 1 and len(lost) == 1 and won != lost, (seed, won, lost)
        p.step(GRACE + 1)  # the winner deletes the old IKE SA after its grace
        survivor = _assert_converged(p, kids)
        # the survivor is the IKE SA the winner initiated (its SPIi is the winner's)
        winner = p.client if won == {"client"} else p.server
        (sa,) = winner.ike_sas(TUNNEL)
        assert sa.initiator and _spis(sa) == survivor
        winners |= won
    assert winners == {"client", "server"}  # both outcomes of the tie-break ran


def _held(p: Pair, from_client: bool) -> list[tuple[bytes, tuple, tuple]]:
    eng = p.client if from_client else p.server
    return eng.datagrams_to_send()


def _deliver(p: Pair, out: list, to_server: bool) -> None:
    eng = p.server if to_server else p.client
    for data, local, remote in out:
        eng.receive_datagram(data, remote, local, p.now)
    p.collect()


def test_only_one_side_detects_the_collision() -> None:
    """§2.8.2's special case: the client finishes its rekey before it sees the
    server's, and answers that one TEMPORARY_FAILURE; the server, which had
    answered the client's, keeps the client's new IKE SA."""
    p = _pair(1)
    kids = _children(p)
    assert p.client.rekey_ike(TUNNEL, p.now) and p.server.rekey_ike(TUNNEL, p.now)
    req_c, req_s = _held(p, True), _held(p, False)
    _deliver(p, req_c, to_server=True)  # server: collision, answers the client's
    _deliver(p, _held(p, False), to_server=False)  # client: done, its old SA is REKEYED
    _deliver(p, req_s, to_server=False)  # client: TEMPORARY_FAILURE
    _deliver(p, _held(p, True), to_server=True)
    assert p.server.drops["ike_rekey_collision"] == 1 and not p.client.drops["ike_rekey_collision"]
    (got,) = p.events(ev.NegotiationFailed)
    (sent,) = p.events(ev.NegotiationFailed, "client")
    assert (got.notify, got.sent) == ("TEMPORARY_FAILURE", False)
    assert (sent.notify, sent.sent) == ("TEMPORARY_FAILURE", True)
    p.server_events.remove(got)
    p.client_events.remove(sent)
    p.roundtrip()
    p.step(GRACE + 1)
    (sa,) = p.client.ike_sas(TUNNEL)
    assert sa.initiator  # the client's rekey made the survivor
    _assert_converged(p, kids)


def test_the_losers_delete_overtakes_the_winners_answer() -> None:
    """The loser deletes its redundant IKE SA as soon as it knows; if the answer
    the winner still waits for is lost (or late), that DELETE arrives first. The
    winner must not take it for the end of its Child SAs."""
    for seed in range(64):
        p = _pair(seed)
        kids = _children(p)
        assert p.client.rekey_ike(TUNNEL, p.now) and p.server.rekey_ike(TUNNEL, p.now)
        req_c, req_s = _held(p, True), _held(p, False)
        _deliver(p, req_c, to_server=True)  # server answers the client's rekey ...
        late_answer = _held(p, False)  # ... but that answer is held back
        _deliver(p, req_s, to_server=False)  # client answers the server's
        _deliver(p, _held(p, True), to_server=True)  # server decides
        if p.server.drops["ike_rekey_collision_lost"]:
            break
    else:
        raise AssertionError("no seed made the server lose")
    delete = _held(p, False)  # the server deletes its redundant IKE SA
    assert [decode(d).header.exchange for d, _, _ in delete] == [ExchangeType.INFORMATIONAL]
    _deliver(p, delete, to_server=False)
    assert p.client.drops["ike_rekey_collision_early_delete"] == 1
    assert not p.events(ev.ChildSaDeleted, "client")
    _deliver(p, _held(p, True), to_server=True)  # the DELETE's answer
    _deliver(p, late_answer, to_server=False)  # finally: the client wins
    assert p.client.drops["ike_rekey_collision_won"] == 1
    p.roundtrip()
    p.step(GRACE + 1)
    _assert_converged(p, kids)
