"""Make-before-break for Child SA rekeys we start (DESIGN §3, issue 6): the old
SA is deleted with the peer only once the control service reports the new one
applied on every worker (``engine.child_sa_ready``), with ``rekey_delete_delay``
as the upper bound when that confirmation never comes."""

from __future__ import annotations

from control.ike import events as ev
from control.ike.engine import IkeConfig
from control.ike.messages import decode
from control.ike.payloads import ExchangeType

from .pair import TUNNEL, make_pair

DELAY = 10.0


def _pair():
    cfg = IkeConfig(strict=True, rekey_delete_delay=DELAY, dpd_interval=1e6)
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=1e6))
    p.connect()
    return p


def _rekey_by_server(p) -> tuple[ev.ChildSaInstalled, ev.ChildSaInstalled]:
    (first,) = p.events(ev.ChildSaInstalled)
    assert p.server.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    new = p.events(ev.ChildSaInstalled)[-1]
    assert new.replaces == (first.inbound.spi, first.outbound.spi)
    return first, new  # type: ignore[return-value]


def _deletes_sent(p, since: int) -> int:
    return sum(
        1
        for to_s, d in p.captured[since:]
        if not to_s
        and decode(d).header.exchange == ExchangeType.INFORMATIONAL
        and not decode(d).header.is_response
    )


def test_old_sa_waits_for_every_worker_then_goes_at_once() -> None:
    p = _pair()
    first, new = _rekey_by_server(p)
    mark = len(p.captured)
    # the bus is slow: well past the old fixed 2 s, both SAs still live on both sides
    p.step(DELAY - 1.0)
    assert not p.events(ev.ChildSaDeleted) and not p.events(ev.ChildSaDeleted, "client")
    assert _deletes_sent(p, mark) == 0
    # a confirmation for the OLD SA, or for an unknown SPI, deletes nothing
    assert not p.server.child_sa_ready(TUNNEL, first.inbound.spi, p.now)
    assert not p.server.child_sa_ready(TUNNEL, 0x4242, p.now)
    assert not p.server.child_sa_ready("0" * 32, new.inbound.spi, p.now)
    p.roundtrip()
    assert not p.events(ev.ChildSaDeleted)
    # every worker has the new SA: the old one is deleted with the peer right now
    assert p.server.child_sa_ready(TUNNEL, new.inbound.spi, p.now)
    p.roundtrip()
    (gone,) = p.events(ev.ChildSaDeleted)
    assert gone.inbound_spi == first.inbound.spi and gone.reason == "rekeyed"
    (peer_gone,) = p.events(ev.ChildSaDeleted, "client")
    assert peer_gone.outbound_spi == first.inbound.spi
    assert _deletes_sent(p, mark) == 1
    # idempotent: a repeated confirmation does nothing more
    assert not p.server.child_sa_ready(TUNNEL, new.inbound.spi, p.now)
    p.step(DELAY + 1)
    assert len(p.events(ev.ChildSaDeleted)) == 1
    assert p.server.drops["make_before_break_timeout"] == 0
    (sa,) = p.server.ike_sas(TUNNEL)
    assert list(sa.children) == [new.inbound.spi]


def test_a_confirmation_that_never_comes_is_bounded_by_rekey_delete_delay() -> None:
    p = _pair()
    first, new = _rekey_by_server(p)
    p.step(DELAY - 0.5)
    assert not p.events(ev.ChildSaDeleted)
    p.step(1.0)
    (gone,) = p.events(ev.ChildSaDeleted)
    assert gone.inbound_spi == first.inbound.spi and gone.reason == "rekeyed"
    assert p.events(ev.ChildSaDeleted, "client")
    assert p.server.drops["make_before_break_timeout"] == 1
    # a late confirmation is harmless
    assert not p.server.child_sa_ready(TUNNEL, new.inbound.spi, p.now)


def test_peer_started_rekey_is_not_ours_to_delete() -> None:
    """When the peer rekeys, the peer deletes the old SA (§2.8): a confirmation
    for the new one sends nothing."""
    p = _pair()
    (first,) = p.events(ev.ChildSaInstalled)
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    new = p.events(ev.ChildSaInstalled)[-1]
    mark = len(p.captured)
    assert not p.server.child_sa_ready(TUNNEL, new.inbound.spi, p.now)
    p.roundtrip()
    assert _deletes_sent(p, mark) == 0
    # the client (the rekey's initiator, also an engine) deletes it when told
    client_new = p.events(ev.ChildSaInstalled, "client")[-1]
    assert p.client.child_sa_ready(TUNNEL, client_new.inbound.spi, p.now)
    p.roundtrip()
    (gone,) = p.events(ev.ChildSaDeleted)
    assert gone.inbound_spi == first.inbound.spi


def test_waiting_survives_an_ike_rekey_and_a_restart() -> None:
    """The Child SA moves to the new IKE SA (§2.18) and through export/import."""
    from control.ike.engine import IkeEngine

    from .pair import make_lookup, server_tunnel

    p = _pair()
    first, new = _rekey_by_server(p)
    assert p.client.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    blob = p.server.export_state()
    p.server = IkeEngine(
        IkeConfig(strict=True, rekey_delete_delay=DELAY, dpd_interval=1e6),
        make_lookup([server_tunnel()]),
    )
    p.server.import_state(blob, p.now)
    assert p.server.child_sa_ready(TUNNEL, new.inbound.spi, p.now)
    p.roundtrip()
    (peer_gone,) = p.events(ev.ChildSaDeleted, "client")
    assert peer_gone.outbound_spi == first.inbound.spi
