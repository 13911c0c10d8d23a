"""Control's IKE state on disk: one sealed row per IKE SA (issue 7's restart story).

The real engine as responder, real in-memory initiators (``Peer`` of
test_service_ike), the real store and bus. What a user would notice: after a
restart every IKE SA continues (DPD answered, no renegotiation); the cost of a
change is one row, not the whole state; a store written by the previous
version (one blob of every IKE SA) still restarts into working IKE SAs; and a
new Child SA reaches the bus before any IKE row is written."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgpack

from control.ike.engine import IkeEngine, TunnelAuth
from control.ike.events import ChildSaInstalled, IkeSaDeleted, IkeSaEstablished
from control.service import ControlService
from control.store import Store
from replication.records import TrafficSelector
from tests.control.api_support import add_token, ipsec
from tests.control.test_service import ACCT, Bus, api
from tests.control.test_service_ike import CLIENT, SERVER, Peer, ike_config, running

BASE = f"/accounts/{ACCT}/magic/ipsec_tunnels"


def ike_rows(store: Store) -> dict[str, bytes]:
    return dict(store.sealed_items(ControlService.IKE_SA_PREFIX))


def row_stamps(store: Store) -> dict[str, str]:
    """Row key -> modified_on (microseconds): which rows a write touched."""
    cur = store._db.execute(
        "SELECT key, modified_on FROM sealed_state WHERE key LIKE 'ike/%' ORDER BY key"
    )
    return {k: m for k, m in cur}


def writes(service: ControlService, op: str) -> float:
    value = service.metrics.registry.get_sample_value(
        "anywan_control_ike_state_writes_total", {"op": op}
    )
    return value or 0.0


async def connect_many(service: ControlService, token: str, n: int) -> list[tuple[str, Peer]]:
    peers = []
    for i in range(n):
        tid = (await api(service, token, "POST", BASE, ipsec(f"t{i}", i)))["id"]
        psk = (await api(service, token, "POST", f"{BASE}/{tid}/psk_generate"))["psk"]
        peer = Peer(service)
        peer.connect(tid, psk, "fqdn")  # pumped to the end before the next one
        assert [e for e in peer.events if isinstance(e, IkeSaEstablished)]
        peers.append((tid, peer))
    await asyncio.sleep(0)  # the rows are written after the flush
    return peers


def dpd_answered(service: ControlService, tid: str, peer: Peer) -> None:
    peer.service = service
    peer.events.clear()
    assert peer.client.send_dpd(tid, time.monotonic())
    peer.pump()
    assert not [e for e in peer.events if isinstance(e, IkeSaDeleted)], peer.events
    assert not [e for e in peer.events if isinstance(e, IkeSaEstablished)]
    # The answer moved the peer's Message ID: a second DPD would fail if the
    # restored SA had the wrong one.
    assert peer.client.send_dpd(tid, time.monotonic())
    peer.pump()
    assert not [e for e in peer.events if isinstance(e, IkeSaDeleted)], peer.events


async def test_restart_restores_every_ike_sa_and_a_change_rewrites_one_row(
    tmp_path: Path,
) -> None:
    n = 12
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        peers = await connect_many(service, token, n)
        assert len(ike_rows(store)) == n
        assert store.get_sealed(ControlService.IKE_STATE_KEY) is None  # no blob any more
        puts = writes(service, "put")
        stamps = row_stamps(store)

        # Nothing changed: a sweep over every SA writes nothing.
        assert service.sweep_ike_state() == 0
        assert row_stamps(store) == stamps

        # One peer's DPD moves that IKE SA's Message IDs (no event): the
        # sweep rewrites exactly its row.
        tid3, peer3 = peers[3]
        assert peer3.client.send_dpd(tid3, time.monotonic())
        peer3.pump()
        assert service.sweep_ike_state() == 1
        assert writes(service, "put") == puts + 1
        after = row_stamps(store)
        changed = [k for k in after if after[k] != stamps[k]]
        assert len(changed) == 1 and len(after) == n
        (ours,) = [sa.our_spi for sa in service.engine.ike_sas(tid3)]
        assert changed == [ControlService.IKE_SA_PREFIX + ours.hex()]

        # A Child SA rekey (events) rewrites that IKE SA's row only.
        stamps = row_stamps(store)
        tid5, peer5 = peers[5]
        assert peer5.client.rekey_child(tid5, time.monotonic())
        peer5.pump()
        await asyncio.sleep(0)
        after = row_stamps(store)
        (ours5,) = [sa.our_spi for sa in service.engine.ike_sas(tid5)]
        assert [k for k in after if after[k] != stamps[k]] == [
            ControlService.IKE_SA_PREFIX + ours5.hex()
        ]
        # Rows are sealed: no IKE or Child SA key in the database files.
        keys = [
            rec.enc_key
            for rec in service.publisher.items().values()
            if hasattr(rec, "enc_key") and rec.enc_key
        ]
        assert len(keys) >= 2 * n
    files = [f.read_bytes() for f in tmp_path.iterdir() if f.is_file()]
    for key in keys:
        assert all(key not in data for data in files)

    async with running(tmp_path, bus) as (service, store):
        assert service.restore_ike_state(time.monotonic())
        assert len(service.engine.sas) == n
        for tid, peer in peers:
            dpd_answered(service, tid, peer)
        view = await api(service, token, "GET", f"{BASE}/{peers[0][0]}/sas")
        assert [v["state"] for v in view["ike_sas"]] == ["established"]


async def test_deleted_tunnel_removes_only_its_ike_row(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        peers = await connect_many(service, token, 3)
        (gone,) = [sa.our_spi for sa in service.engine.ike_sas(peers[1][0])]
        stamps = row_stamps(store)
        await api(service, token, "DELETE", f"{BASE}/{peers[1][0]}")
        peers[1][1].pump()
        await asyncio.sleep(0)
        service.sweep_ike_state()
        left = row_stamps(store)
        assert ControlService.IKE_SA_PREFIX + gone.hex() not in left
        assert left == {k: v for k, v in stamps.items() if not k.endswith(gone.hex())}
        assert writes(service, "delete") == 1


async def test_store_with_the_old_single_blob_is_migrated_to_rows(tmp_path: Path) -> None:
    n = 5
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        peers = await connect_many(service, token, n)
        # What the previous version left behind: one blob of every IKE SA
        # (engine.export_state(), sealed under ike/state) and no rows.
        blob = service.engine.export_state()
        assert len(msgpack.unpackb(blob)["sas"]) == n
        service.engine = None  # stop() must not write rows now
        with store.transaction():
            for key in ike_rows(store):
                store.delete_sealed(key)
            store.put_sealed(ControlService.IKE_STATE_KEY, blob)

    async with running(tmp_path, bus) as (service, store):
        assert service.restore_ike_state(time.monotonic())
        assert store.get_sealed(ControlService.IKE_STATE_KEY) is None
        assert len(ike_rows(store)) == n
        assert len(service.engine.sas) == n
        for tid, peer in peers:
            dpd_answered(service, tid, peer)

    # And the rows alone restart it again.
    async with running(tmp_path, bus) as (service, store):
        assert service.restore_ike_state(time.monotonic())
        assert len(service.engine.sas) == n
        dpd_answered(service, *peers[0])


async def test_child_sa_is_published_before_the_ike_row_is_written(tmp_path: Path) -> None:
    """Within one flush the Child SA records reach the bus first; the IKE
    SA's row follows in the next loop turn."""
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        seen: list[tuple[str, int, int]] = []
        real = service.on_ike_event

        def spy(ev: Any) -> None:
            real(ev)
            if isinstance(ev, ChildSaInstalled):
                sa_keys = [k for k in service.publisher.items() if k.startswith("sa/")]
                seen.append((type(ev).__name__, len(sa_keys), len(ike_rows(store))))

        service.on_ike_event = spy  # type: ignore[method-assign]
        tid = (await api(service, token, "POST", BASE, ipsec()))["id"]
        psk = (await api(service, token, "POST", f"{BASE}/{tid}/psk_generate"))["psk"]
        Peer(service).connect(tid, psk, "fqdn")
        assert seen == [("ChildSaInstalled", 2, 0)]  # published, no IKE row yet
        await asyncio.sleep(0)
        assert len(ike_rows(store)) == 1


async def test_restored_rows_keep_their_age(tmp_path: Path) -> None:
    """A row written long before the restart is re-based on when it was
    written: that IKE SA's rekey and Child SA expiry are not pushed late by
    the row's age."""
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        ((tid, _),) = await connect_many(service, token, 1)
        (sa,) = service.engine.ike_sas(tid)
        rekey_in = sa.ike_rekey_at - service.engine.last_now
        ((key, plain),) = ike_rows(store).items()
        row = msgpack.unpackb(plain)
        row["at"] -= 600.0  # as if written ten minutes ago
        with store.transaction():
            store.put_sealed(key, msgpack.packb(row))
        service.engine = None
    async with running(tmp_path, bus) as (service, store):
        now = time.monotonic()
        assert service.restore_ike_state(now)
        (sa,) = service.engine.ike_sas(tid)
        assert abs((sa.ike_rekey_at - now) - (rekey_in - 600.0)) < 5.0


async def test_unreadable_row_is_skipped_and_removed(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        peers = await connect_many(service, token, 2)
        bad = ControlService.IKE_SA_PREFIX + "00" * 8
        with store.transaction():
            store.put_sealed(bad, b"\x93not a row")
    async with running(tmp_path, bus) as (service, store):
        assert service.restore_ike_state(time.monotonic())
        assert len(service.engine.sas) == 2
        service.sweep_ike_state()
        assert bad not in ike_rows(store) and len(ike_rows(store)) == 2
        dpd_answered(service, *peers[1])


async def test_a_flush_writes_the_rows_it_touched_without_waiting_for_the_sweep(
    tmp_path: Path,
) -> None:
    """A DPD moves Message IDs without any event. The transport's flush hook
    hands control the IKE SAs the engine touched (``take_touched``), and their
    rows are written there, before the flush sends the answer — a crash no
    longer loses up to a sweep interval of Message ID moves (which would make
    the restored SA reuse a Message ID the peer has already seen). Only the
    touched SA's row."""
    n = 4
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        peers = await connect_many(service, token, n)
        service._on_ike_flush()
        await asyncio.sleep(0)
        stamps, puts = row_stamps(store), writes(service, "put")
        tid, peer = peers[2]
        assert peer.client.send_dpd(tid, time.monotonic())
        peer.pump()
        service._on_ike_flush()  # what IkeTransport.flush calls before it sends
        assert writes(service, "put") == puts + 1
        after = row_stamps(store)
        (ours,) = [sa.our_spi for sa in service.engine.ike_sas(tid)]
        assert [k for k in after if after[k] != stamps[k]] == [
            ControlService.IKE_SA_PREFIX + ours.hex()
        ]
        row = msgpack.unpackb(store.get_sealed(ControlService.IKE_SA_PREFIX + ours.hex()))
        (sa,) = service.engine.ike_sas(tid)
        assert row["sa"]["mid"][:2] == [sa.peer_next, sa.our_next]
        service._on_ike_flush()  # nothing touched since: nothing written
        await asyncio.sleep(0)
        assert writes(service, "put") == puts + 1


async def test_a_flush_of_half_open_sas_writes_nothing(tmp_path: Path) -> None:
    """IKE_SA_INIT alone (a scan, a flood) touches only half-open SAs, which
    are never saved: the flush hook opens no store transaction for them."""
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        ((tid, _),) = await connect_many(service, token, 1)
        service._on_ike_flush()
        before = writes(service, "put"), row_stamps(store)
        any4 = (TrafficSelector.from_network("0.0.0.0/0"),)
        auth = TunnelAuth(
            account_id=ACCT, tunnel_id=tid, psk=b"x" * 16, local_addr=CLIENT[0],
            local_ts=any4, remote_ts=any4,
        )  # fmt: skip
        stranger = IkeEngine(ike_config(service), lambda ident: None)
        stranger.initiate(auth, local=CLIENT, remote=SERVER, now=time.monotonic())
        ((init, local, remote),) = stranger.datagrams_to_send()
        txns: list[int] = []
        real_txn = store.transaction

        def counting_txn() -> Any:
            txns.append(1)
            return real_txn()

        store.transaction = counting_txn  # type: ignore[method-assign]
        try:
            service.engine.receive_datagram(init, remote, local, time.monotonic())
            assert service.engine.half_open
            service._on_ike_flush()
        finally:
            store.transaction = real_txn  # type: ignore[method-assign]
        assert not txns and (writes(service, "put"), row_stamps(store)) == before
