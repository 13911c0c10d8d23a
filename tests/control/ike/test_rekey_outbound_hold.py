"""A Child SA rekey the PEER starts: our outbound SA of the replacement is held
back until the peer deletes the old Child SA (``ChildSa.outbound_held``).

Why: the peer installs the new SA only when our answer reaches it; a worker
that switched to the new outbound SPI the moment we answered would send
packets the peer cannot decrypt yet (the few-millisecond loss seen in
``bench.failover``'s rekey reps). The peer keeps the old inbound SA until it
deletes it, so sending on the old one until then loses nothing. strongSwan
behaves the same as a rekey responder."""

from __future__ import annotations

from control.ike import events as ev
from control.ike.engine import IkeConfig

from .pair import TUNNEL, make_pair


def _pair():
    cfg = IkeConfig(strict=True, dpd_interval=1e6)
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=1e6))
    p.connect()
    return p


def _server_events(p, since: int) -> list[object]:
    return [
        e
        for e in p.server_events[since:]
        if isinstance(e, ev.ChildSaInstalled | ev.ChildSaUpdated | ev.ChildSaDeleted)
    ]


def test_held_until_the_peer_deletes_the_old_sa_then_released_before_its_tombstone() -> None:
    p = _pair()
    (first,) = p.events(ev.ChildSaInstalled)
    assert not first.hold_outbound  # IKE_AUTH's Child SA: nothing to wait for
    mark = len(p.server_events)
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    (new,) = _server_events(p, mark)
    assert isinstance(new, ev.ChildSaInstalled)
    assert new.replaces == (first.inbound.spi, first.outbound.spi)
    assert new.hold_outbound
    (sa,) = p.server.ike_sas(TUNNEL)
    assert sa.children[new.inbound.spi].outbound_held

    # the peer (the rekey's initiator, also an engine) deletes the old SA
    client_new = p.events(ev.ChildSaInstalled, "client")[-1]
    assert p.client.child_sa_ready(TUNNEL, client_new.inbound.spi, p.now)
    p.roundtrip()
    released, gone = _server_events(p, mark)[1:]
    # the new outbound SA is released first, then the old pair goes
    assert isinstance(released, ev.ChildSaUpdated) and not released.hold_outbound
    assert released.outbound == new.outbound and released.inbound == new.inbound
    assert isinstance(gone, ev.ChildSaDeleted) and gone.reason == "rekeyed"
    assert gone.inbound_spi == first.inbound.spi
    assert not sa.children[new.inbound.spi].outbound_held


def test_a_rekey_we_start_publishes_both_at_once() -> None:
    """Our own rekey: the peer installed the new SA before its answer left, and
    we delete the old one ourselves once every worker has the new pair."""
    p = _pair()
    mark = len(p.server_events)
    assert p.server.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    (new,) = _server_events(p, mark)
    assert isinstance(new, ev.ChildSaInstalled) and new.replaces and not new.hold_outbound


def test_a_held_sa_the_peer_deletes_itself_is_never_released() -> None:
    """The peer drops the replacement (e.g. the redundant SA of a §2.8.1
    collision): its held outbound SA is tombstoned, never published."""
    p = _pair()
    mark = len(p.server_events)
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    (new,) = _server_events(p, mark)
    client_new = p.events(ev.ChildSaInstalled, "client")[-1]
    assert p.client.delete_child(TUNNEL, client_new.inbound.spi, p.now)
    p.roundtrip()
    later = _server_events(p, mark)[1:]
    assert not [e for e in later if isinstance(e, ev.ChildSaUpdated)]
    (gone,) = later
    assert isinstance(gone, ev.ChildSaDeleted) and gone.inbound_spi == new.inbound.spi


def test_an_old_sa_the_peer_never_deletes_releases_the_outbound_sa_when_it_expires() -> None:
    """A peer that rekeys but never deletes the old SA: when the old SA
    expires, the held outbound SA is released at once — before our DELETE
    for the old one leaves, not after its answer."""
    life = 100.0
    cfg = IkeConfig(strict=True, dpd_interval=1e6, child_lifetime=life, rekey_jitter=0.0)
    # the client never deletes what it rekeyed (no confirmation, no fallback)
    ccfg = IkeConfig(strict=True, dpd_interval=1e6, rekey_delete_delay=1e9)
    p = make_pair(config=cfg, client_config=ccfg)
    p.connect()
    (first,) = p.events(ev.ChildSaInstalled)
    p.step(life * 0.5)
    mark = len(p.server_events)
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    (new,) = _server_events(p, mark)
    assert isinstance(new, ev.ChildSaInstalled) and new.hold_outbound
    # just past the old SA's hard expiry: run the server's timer by hand and
    # look at its events before any datagram moves
    expiry = (p.now - life * 0.5) + life * (1 + cfg.expire_margin)
    p.server.handle_timer(expiry + 0.01)
    evs = []
    while (e := p.server.next_event()) is not None:
        evs.append(e)
    released = [e for e in evs if isinstance(e, ev.ChildSaUpdated)]
    assert [e.inbound.spi for e in released] == [new.inbound.spi]
    assert not released[0].hold_outbound
    (sa,) = p.server.ike_sas(TUNNEL)
    assert first.inbound.spi in sa.children  # still there: our DELETE is only queued
