"""An IKE SA left REKEYED (RFC 7296 §2.18) at a control restart still goes.

After an IKE SA rekey the old IKE SA stays REKEYED for a while: the rekey's
initiator deletes it after a grace period (``old_ike_sa_grace``), the
responder forgets it once the peer's DELETE came or its linger ran out. A
control restart in that window must not keep it for good: it would sit in the
engine (and as a row in the store) forever, never deleted with the peer.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from control.ike import events as ev
from control.ike.engine import IkeConfig, IkeEngine
from control.ike.state import IkeState

from .pair import TUNNEL, Pair, make_lookup, make_pair, server_tunnel

GRACE = IkeConfig().old_ike_sa_grace
QUIET = dict(strict=True, dpd_interval=1e6, ike_lifetime=1e7, child_lifetime=1e7)


def _pair() -> Pair:
    p = make_pair(config=IkeConfig(**QUIET), client_config=IkeConfig(**QUIET))  # type: ignore[arg-type]
    p.connect()
    assert p.events(ev.ChildSaInstalled)
    return p


def _rekeyed(engine: IkeEngine) -> list[Any]:
    return [sa for sa in engine.sas.values() if sa.state is IkeState.REKEYED]


def _restart(p: Pair, blob: bytes) -> None:
    """Control restarts: a fresh server engine, the exported state imported."""
    p.server = IkeEngine(IkeConfig(**QUIET), make_lookup([server_tunnel()]))  # type: ignore[arg-type]
    p.server.import_state(blob, p.now)


def test_our_rekey_deletes_the_old_ike_sa_after_a_restart() -> None:
    """We rekeyed (§2.18: so we delete the old IKE SA); control restarted
    within the grace period. The DELETE still goes out, both sides drop it."""
    p = _pair()
    assert p.server.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    assert len(_rekeyed(p.server)) == 1
    _restart(p, p.server.export_state())
    assert len(p.server.sas) == 2 and len(_rekeyed(p.server)) == 1
    p.step(GRACE + 1)
    # well before the client's own linger (64 s) ran out: our DELETE did it
    assert len(p.server.sas) == 1 and len(p.client.sas) == 1
    (s_sa,), (c_sa,) = p.server.ike_sas(TUNNEL), p.client.ike_sas(TUNNEL)
    assert (s_sa.spi_i, s_sa.spi_r) == (c_sa.spi_i, c_sa.spi_r)
    assert s_sa.state is IkeState.ESTABLISHED and len(s_sa.children) == 1
    assert not p.events(ev.IkeSaDeleted) and not p.events(ev.ChildSaDeleted)


def test_peer_rekey_whose_delete_never_arrives_is_forgotten_after_a_restart() -> None:
    """The peer rekeyed and its DELETE of the old IKE SA was lost while
    control was down: the restored REKEYED SA is forgotten when its linger
    runs out, as it would have been without the restart."""
    p = _pair()
    assert p.client.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    assert len(_rekeyed(p.server)) == 1
    blob = p.server.export_state()
    p.drop = lambda data, to_server: to_server  # control is down: nothing reaches it
    # the client sends its DELETE and every retransmission into the void,
    # then gives up on the old IKE SA (§2.4)
    p.step(GRACE + 200.0)
    assert len(p.client.sas) == 1 and p.client.drops["gave_up"] == 1
    p.drop = None
    _restart(p, blob)
    assert len(_rekeyed(p.server)) == 1
    p.step(300.0)
    assert len(p.server.sas) == 1
    (s_sa,) = p.server.ike_sas(TUNNEL)
    assert s_sa.state is IkeState.ESTABLISHED and len(s_sa.children) == 1
    assert not p.events(ev.IkeSaDeleted) and not p.events(ev.ChildSaDeleted)


def test_rekeyed_sa_from_an_older_row_is_still_cleaned_up() -> None:
    """State written before the linger was stored: the REKEYED SA goes
    ``old_ike_sa_grace`` after the time it is re-based on."""
    p = _pair()
    assert p.server.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    obj = msgpack.unpackb(p.server.export_state(), raw=False)
    for d in obj["sas"]:
        d.pop("linger", None)
        d.pop("retire", None)
    _restart(p, msgpack.packb(obj, use_bin_type=True))
    assert len(_rekeyed(p.server)) == 1
    p.step(GRACE + 1)
    assert len(p.server.sas) == 1 and not _rekeyed(p.server)
    assert not p.events(ev.IkeSaDeleted) and not p.events(ev.ChildSaDeleted)
    p.step(300.0)  # the client (rekey responder here) forgets its old one too
    assert len(p.client.sas) == 1


def _rows(blob: bytes) -> list[bytes]:
    """The export as one blob per IKE SA, the way the control service stores
    and imports them (one row each, in no particular order)."""
    obj = msgpack.unpackb(blob, raw=False)
    return [msgpack.packb({"v": obj["v"], "sas": [d]}, use_bin_type=True) for d in obj["sas"]]


@pytest.mark.parametrize("order", [1, -1], ids=["old-row-first", "new-row-first"])
def test_late_child_delete_on_the_old_ike_sa_after_a_restart(order: int) -> None:
    """We rekeyed the IKE SA while the peer's DELETE of the Child SA was on
    its way over the old one (lost once); control restarted before the
    peer's retransmission came. The Child SA lives in the new IKE SA now, and
    the DELETE must still reach it there (§2.18, §1.4.1): ignoring it would
    keep sending on an SA the peer has deleted until it expires."""
    p = _pair()
    (c_sa,) = p.client.ike_sas(TUNNEL)
    (child,) = c_sa.children.values()
    assert p.client.delete_child(TUNNEL, child.spi_in, p.now)
    assert p.server.rekey_ike(TUNNEL, p.now)
    lost: list[bytes] = []

    def drop_first_delete(data: bytes, to_server: bool) -> bool:
        if to_server and not lost and data[18] == 37:  # INFORMATIONAL request
            lost.append(data)
            return True
        return False

    p.drop = drop_first_delete
    p.roundtrip()
    assert lost and len(_rekeyed(p.server)) == 1
    rows = _rows(p.server.export_state())
    assert len(rows) == 2
    p.server = IkeEngine(IkeConfig(**QUIET), make_lookup([server_tunnel()]))  # type: ignore[arg-type]
    for row in rows[::order]:
        p.server.import_state(row, p.now)
    (old,) = _rekeyed(p.server)
    (new,) = (sa for sa in p.server.sas.values() if sa is not old)
    assert old.owner() is new and len(new.children) == 1
    p.server_events.clear()
    p.step(30.0)  # the peer retransmits its DELETE on the old IKE SA
    (gone,) = p.events(ev.ChildSaDeleted)
    assert gone.inbound_spi == child.spi_out and not new.children
