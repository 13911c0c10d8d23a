"""``IkeEngine.take_touched``: the IKE SAs whose state may have changed, so
the control service writes those rows after each flush instead of comparing
every IKE SA each second. Missing one would leave a stale row (a restart then
reuses old Message IDs); these cover each way an IKE SA changes."""

from __future__ import annotations

from control.ike.engine import IkeConfig
from control.ike.state import IkeState

from .pair import TUNNEL, Pair, make_pair

QUIET = dict(strict=True, dpd_interval=1e6, ike_lifetime=1e7, child_lifetime=1e7)


def _pair() -> Pair:
    p = make_pair(config=IkeConfig(**QUIET), client_config=IkeConfig(**QUIET))  # type: ignore[arg-type]
    assert p.server.take_touched() == set()  # starts the tracking
    p.connect()
    return p


def test_an_engine_nobody_asks_keeps_no_set() -> None:
    """The engine-only users (bench.ike, the initiators of the tests) never
    call take_touched: nothing accumulates for them."""
    p = make_pair(config=IkeConfig(**QUIET), client_config=IkeConfig(**QUIET))  # type: ignore[arg-type]
    p.connect()
    assert p.client.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    assert not p.server._touched and not p.server._touched_tunnels


def _spis(p: Pair) -> set[bytes]:
    return {sa.our_spi for sa in p.server.ike_sas(TUNNEL)}


def test_each_change_reports_its_ike_sas_and_nothing_else() -> None:
    p = _pair()
    assert p.server.take_touched() == _spis(p)  # established
    assert p.server.take_touched() == set()  # nothing since
    p.step(10.0)
    assert p.server.take_touched() == set()  # idle: no timer ran
    assert p.client.send_dpd(TUNNEL, p.now)  # the peer's request moves peer_next
    p.roundtrip()
    assert p.server.take_touched() == _spis(p)
    assert p.server.send_dpd(TUNNEL, p.now)  # ours moves our_next
    assert p.server.take_touched() == _spis(p)
    p.roundtrip()
    assert p.server.take_touched() == _spis(p)  # its answer cleared the pending request


def test_an_ike_rekey_reports_old_and_new_and_a_deleted_sa_is_reported() -> None:
    p = _pair()
    (old,) = _spis(p)
    p.server.take_touched()
    assert p.client.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    (new,) = [sa.our_spi for sa in p.server.ike_sas(TUNNEL) if sa.state is IkeState.ESTABLISHED]
    touched = p.server.take_touched()
    assert {old, new} <= touched
    p.step(300.0)  # the client deletes the old IKE SA; the server forgets it
    assert old not in p.server.sas and old in p.server.take_touched()
    p.server.delete_tunnel(TUNNEL, p.now)
    p.roundtrip()
    assert new in p.server.take_touched() and not p.server.sas
