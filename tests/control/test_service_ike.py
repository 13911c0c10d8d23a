"""The control service with the REAL IKE engine as responder.

An in-memory IKEv2 initiator (a second IkeEngine, as the IKE tests use)
negotiates with the engine that control.service feeds from its store: the
PSK comes from psk_generate through the sealed store, the negotiated Child SA
keys reach the real bus Publisher, a regenerated PSK locks the old one out,
and deleting the tunnel through the API sends DELETE to the peer and
tombstones every SA. No stubs: every part below the API is the real one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from control.api.openapi import build_openapi
from control.ike.engine import IkeConfig, IkeEngine, TunnelAuth
from control.ike.events import ChildSaDeleted, ChildSaInstalled, IkeSaDeleted, IkeSaEstablished
from control.service import ControlService
from control.store import Store
from replication.records import Direction, SaRecord, TrafficSelector
from tests.control.api_support import add_token, ipsec
from tests.control.test_api_openapi import check, response_schema
from tests.control.test_service import ACCT, Bus, api, start

SERVER = ("203.0.113.1", 500)
CLIENT = ("198.51.100.10", 500)


def ike_config(service: Any) -> IkeConfig:
    """As the transport sets it: ``now`` is monotonic, SA records carry Unix times."""
    return IkeConfig(
        id_suffix=service.config.id_suffix, unix_time_offset=time.time() - time.monotonic()
    )


def ike_engine(service: Any) -> IkeEngine:
    return IkeEngine(ike_config(service), service.lookup)


def restored_engine(service: Any) -> IkeEngine:
    """:func:`ike_engine` with the persisted IKE SAs imported before the
    service starts, as ``_start_ike`` does before the first datagram."""
    engine = service.engine = ike_engine(service)
    assert service.restore_ike_state(time.monotonic())
    return engine


@contextlib.asynccontextmanager
async def running(
    state: Path, bus: Bus, *, engine: Callable[[Any], Any] = ike_engine
) -> AsyncIterator[tuple[ControlService, Store]]:
    """A (re)started control service on ``state`` with a real IKE engine;
    stopped and its store closed on the way out, whatever happens inside."""
    service, store = await start(state, bus, engine=engine)
    try:
        yield service, store
    finally:
        await service.stop()
        store.close()


class Peer:
    """A customer router: an initiator engine wired to control's engine in memory."""

    def __init__(self, service: Any, *, flush: bool = False) -> None:
        """``flush``: call control's flush hook before the server's datagrams
        go out, as ``IkeTransport`` does (the rows it touched are written)."""
        self.service = service
        self.client = IkeEngine(IkeConfig(), lambda ident: None)
        self.events: list[Any] = []
        self.flush = flush

    def pump(self, rounds: int = 20) -> None:
        server = self.service.engine
        for _ in range(rounds):
            moved = 0
            for data, local, remote in self.client.datagrams_to_send():
                server.receive_datagram(data, remote, local, time.monotonic())
                moved += 1
            if self.flush:
                while (ev := server.next_event()) is not None:
                    self.service.on_ike_event(ev)
                self.service._on_ike_flush()
            for data, local, remote in server.datagrams_to_send():
                self.client.receive_datagram(data, remote, local, time.monotonic())
                moved += 1
            while (ev := server.next_event()) is not None:
                self.service.on_ike_event(ev)
            while (ev := self.client.next_event()) is not None:
                self.events.append(ev)
            if not moved:
                return

    def connect(self, tunnel_id: str, psk: str, id_kind: str) -> None:
        any4 = (TrafficSelector.from_network("0.0.0.0/0"),)
        tunnel = TunnelAuth(
            account_id=ACCT, tunnel_id=tunnel_id, psk=psk.encode(), local_addr=CLIENT[0],
            local_ts=any4, remote_ts=any4,
        )  # fmt: skip
        self.client.initiate(tunnel, local=CLIENT, remote=SERVER, now=time.monotonic(),
                             id_kind=id_kind)  # fmt: skip
        self.pump()


async def test_real_engine_negotiates_publishes_and_deletes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    service.engine = IkeEngine(ike_config(service), service.lookup)
    pub = service.publisher
    try:
        token = add_token(store, ACCT)
        base = f"/accounts/{ACCT}/magic/ipsec_tunnels"
        tid = (await api(service, token, "POST", base, ipsec()))["id"]

        # No PSK yet: the handshake is refused and nothing is published.
        peer = Peer(service)
        peer.connect(tid, "not-yet-a-psk-0000", "fqdn")
        assert not any(k.startswith("sa/") for k in pub.items())

        psk = (await api(service, token, "POST", f"{base}/{tid}/psk_generate"))["psk"]
        peer = Peer(service)
        peer.connect(tid, psk, "fqdn")
        mine = [e for e in peer.events if isinstance(e, ChildSaInstalled)]
        assert len(mine) == 1, peer.events
        sas = {k: v for k, v in pub.items().items() if isinstance(v, SaRecord)}
        assert len(sas) == 2
        inbound = next(v for v in sas.values() if v.direction is Direction.IN)
        outbound = next(v for v in sas.values() if v.direction is Direction.OUT)
        # What control published is what the peer negotiated, crosswise.
        assert inbound.spi == mine[0].outbound.spi and inbound.enc_key == mine[0].outbound.enc_key
        assert outbound.spi == mine[0].inbound.spi
        assert outbound.enc_key == mine[0].inbound.enc_key
        assert inbound.tunnel_id == tid and inbound.account_id == ACCT
        view = await api(service, token, "GET", f"{base}/{tid}/sas")
        doc = build_openapi()
        schema = response_schema(
            doc, "/accounts/{account_id}/magic/ipsec_tunnels/{id}/sas", "GET", 200
        )
        check(doc, schema["properties"]["result"], view)  # real IKE data conforms too
        assert len(view["ike_sas"]) == 1 and view["ike_sas"][0]["id_type"] == "fqdn"
        assert {c["spi"] for c in view["child_sas"]} == {
            f"0x{inbound.spi:08x}",
            f"0x{outbound.spi:08x}",
        }

        # A regenerated PSK: the old one no longer authenticates, the new one does.
        new_psk = (await api(service, token, "POST", f"{base}/{tid}/psk_generate"))["psk"]
        stale = Peer(service)
        stale.connect(tid, psk, "key_id")
        assert not [e for e in stale.events if isinstance(e, IkeSaEstablished)]
        fresh = Peer(service)
        fresh.connect(tid, new_psk, "key_id")
        assert [e for e in fresh.events if isinstance(e, IkeSaEstablished)]
        text = service.metrics.render().decode()
        assert 'anywan_control_ike_handshakes_total{result="ok"} 2.0' in text
        assert 'anywan_control_ike_auth_failures_total{reason="bad_auth"}' in text
        # The fresh IKE_AUTH carried INITIAL_CONTACT (RFC 7296 §2.4): the first
        # peer's SAs are gone from the bus, only the new pair is left.
        (new,) = [e for e in fresh.events if isinstance(e, ChildSaInstalled)]
        assert {k for k in pub.items() if k.startswith("sa/")} == {
            f"sa/in/{new.outbound.spi:08x}",
            f"sa/out/{tid}/{new.inbound.spi:08x}",
        }

        # The peer rekeys its Child SA: the replacement's inbound SA is published
        # next to the old pair (make-before-break), its outbound SA only when the
        # peer DELETEs the old one (RFC 7296 §2.8, after its rekey_delete_delay):
        # until then the peer may not hold the new SA, and it keeps the old
        # inbound one. Then the old pair is tombstoned.
        assert fresh.client.rekey_child(tid, time.monotonic())
        fresh.pump()
        held = {k for k in pub.items() if k.startswith("sa/")}
        assert len(held) == 3
        assert f"sa/out/{tid}/{new.inbound.spi:08x}" in held  # still the old outbound SA
        assert len([k for k in held if k.startswith("sa/out/")]) == 1
        fresh.client.handle_timer(time.monotonic() + fresh.client.config.rekey_delete_delay + 1)
        fresh.pump()
        sa_now = [v for v in pub.items().values() if isinstance(v, SaRecord)]
        assert len(sa_now) == 2 and {v.generation for v in sa_now} == {1}
        assert all(v.replaces in (new.outbound.spi, new.inbound.spi) for v in sa_now)
        assert 'anywan_control_child_sa_rekeys_total{result="child"} 1.0' in (
            service.metrics.render().decode()
        )

        # Deleting the tunnel: DELETE reaches the peers, every SA is tombstoned.
        await api(service, token, "DELETE", f"{base}/{tid}")
        fresh.pump()
        assert [e for e in fresh.events if isinstance(e, IkeSaDeleted)]
        assert not [k for k in pub.items() if k.startswith(("sa/", "tunnel/"))]
        assert store.sealed_items("sa/") == []
        assert (await api(service, "", "GET", "/healthz"))["tunnels"] == 0
    finally:
        await service.stop()
        store.close()
    # Secrets-in-logs, with the real engine in the loop: no PSK, no SA key.
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "IKE SA up" in logs
    for secret in (psk, new_psk, inbound.enc_key.hex(), new.inbound.enc_key.hex(), token):
        assert secret not in logs


async def test_control_restart_continues_ike_sas(tmp_path: Path) -> None:
    """Kill control, start a new one on the same store: the peer's IKE SA goes on
    (DPD answered, Child SA rekeyed over it) without renegotiating, and the
    Child SA records were on the bus the whole time."""
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    service.engine = IkeEngine(ike_config(service), service.lookup)
    token = add_token(store, ACCT)
    base = f"/accounts/{ACCT}/magic/ipsec_tunnels"
    try:
        tid = (await api(service, token, "POST", base, ipsec()))["id"]
        psk = (await api(service, token, "POST", f"{base}/{tid}/psk_generate"))["psk"]
        peer = Peer(service)
        peer.connect(tid, psk, "rfc822")
        assert [e for e in peer.events if isinstance(e, IkeSaEstablished)]
        assert peer.client.send_dpd(tid, time.monotonic())  # Message IDs move on
        peer.pump()
        before = {k: v for k, v in service.publisher.items().items() if k.startswith("sa/")}
        assert len(before) == 2
    finally:
        await service.stop()  # persists the IKE state, sealed
        store.close()
    blob_files = [f for f in tmp_path.iterdir() if f.is_file() and f.name != "master.key"]
    for rec in before.values():
        assert all(rec.enc_key not in f.read_bytes() for f in blob_files)

    service, store = await start(tmp_path, bus)
    try:
        # The new control's bus starts with the SAs: workers keep forwarding.
        assert {k: v for k, v in service.publisher.items().items() if k.startswith("sa/")} == before
        service.engine = IkeEngine(ike_config(service), service.lookup)
        assert service.restore_ike_state(time.monotonic())
        peer.service = service
        peer.events.clear()
        # DPD from the peer is answered by the restarted control on the old IKE SA.
        assert peer.client.send_dpd(tid, time.monotonic())
        peer.pump()
        assert not [e for e in peer.events if isinstance(e, IkeSaDeleted)], peer.events
        # A Child SA rekey over the continued IKE SA lands on the bus.
        assert peer.client.rekey_child(tid, time.monotonic())
        peer.pump()
        (new,) = [e for e in peer.events if isinstance(e, ChildSaInstalled)]
        published = service.publisher.get(f"sa/in/{new.outbound.spi:08x}")
        assert published is not None and published.enc_key == new.outbound.enc_key
        assert not [e for e in peer.events if isinstance(e, IkeSaEstablished)]  # no new IKE SA
        view = await api(service, token, "GET", f"{base}/{tid}/sas")
        (ike,) = view["ike_sas"]
        assert ike["state"] == "established" and ike["id_type"] == "rfc822"
        assert ike["remote_addr"] == CLIENT[0] and ike["created"].startswith("20")
    finally:
        await service.stop()
        store.close()


async def _peer_connected(
    service: Any, store: Any, *, flush: bool = False
) -> tuple[str, str, Peer]:
    """(API token, tunnel id, peer) of a new tunnel the peer connected to."""
    token = add_token(store, ACCT)
    base = f"/accounts/{ACCT}/magic/ipsec_tunnels"
    tid = (await api(service, token, "POST", base, ipsec()))["id"]
    psk = (await api(service, token, "POST", f"{base}/{tid}/psk_generate"))["psk"]
    peer = Peer(service, flush=flush)
    peer.connect(tid, psk, "fqdn")
    return token, tid, peer


async def _peer_rekeyed(service: Any, store: Any) -> tuple[str, str, Peer]:
    """:func:`_peer_connected`, then the peer rekeyed its Child SA: our new
    outbound SA is held until it deletes the old one."""
    token, tid, peer = await _peer_connected(service, store)
    assert peer.client.rekey_child(tid, time.monotonic())
    peer.pump()
    return token, tid, peer


def _sa_keys(service: Any) -> set[str]:
    return {k for k in service.publisher.items() if k.startswith("sa/")}


@pytest.mark.parametrize("rows_lost", [False, True], ids=["restored", "ike-rows-lost"])
async def test_restart_keeps_a_held_outbound_sa_held(tmp_path: Path, rows_lost: bool) -> None:
    """The peer rekeyed its Child SA; control restarts before the peer
    deletes the old one. The new outbound SA must stay held after the
    restart (the peer may not have our answer yet) and go out when the
    restored engine sees the peer's DELETE. If the IKE state was not
    restored (lost rows), nothing would ever release it: it goes out at once."""
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):  # stop() persists the IKE state
        _, tid, peer = await _peer_rekeyed(service, store)
        first, new = [e for e in peer.events if isinstance(e, ChildSaInstalled)]
        new_out = f"sa/out/{tid}/{new.inbound.spi:08x}"
        old_out = f"sa/out/{tid}/{first.inbound.spi:08x}"
        assert new_out not in _sa_keys(service) and old_out in _sa_keys(service)
        assert [k for k, _ in store.sealed_items("held/")] == [f"held/{new_out}"]

    engine = ike_engine if rows_lost else restored_engine
    async with running(tmp_path, bus, engine=engine) as (service, store):
        peer.service = service
        if rows_lost:
            assert new_out in _sa_keys(service) and not store.sealed_items("held/")
            return
        assert new_out not in _sa_keys(service) and old_out in _sa_keys(service)
        # the peer deletes the old Child SA: the restored engine releases the new one
        peer.client.handle_timer(time.monotonic() + peer.client.config.rekey_delete_delay + 1)
        peer.pump()
        assert _sa_keys(service) == {f"sa/in/{new.outbound.spi:08x}", new_out}
        assert not store.sealed_items("held/")
        assert {k for k, _ in store.sealed_items("sa/")} == _sa_keys(service)


async def test_deleting_a_tunnel_drops_its_held_outbound_sa(tmp_path: Path) -> None:
    """A held outbound SA is in the store only: deleting the tunnel removes it too."""
    async with running(tmp_path, Bus(tmp_path)) as (service, store):
        token, tid, peer = await _peer_rekeyed(service, store)
        assert len(store.sealed_items("held/")) == 1
        await api(service, token, "DELETE", f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}")
        peer.pump()
        assert store.sealed_items("held/") == [] and store.sealed_items("sa/") == []


async def test_control_crash_continues_ike_sas(tmp_path: Path) -> None:
    """Like a SIGKILL: no stop(), no final save — the store as it is on disk
    mid-run. The rows each flush wrote before its answers left are enough: the
    peer's next DPD and a Child SA rekey go on over the same IKE SA. (With the
    once-a-second save of before, the DPDs' Message IDs were lost and the
    restored SA refused the peer's next request.)"""
    import shutil

    crashed = tmp_path / "crashed"
    async with running(tmp_path, Bus(tmp_path)) as (service, store):
        _, tid, peer = await _peer_connected(service, store, flush=True)
        await asyncio.sleep(0)  # (the event-driven write of the new IKE SA)
        for _ in range(3):  # Message IDs move, no event
            assert peer.client.send_dpd(tid, time.monotonic())
            peer.pump()
        assert service.engine.send_dpd(tid, time.monotonic())  # ours, too
        service._on_ike_flush()
        peer.pump()
        (sa,) = service.engine.ike_sas(tid)
        assert (sa.peer_next, sa.our_next) == (5, 1)
        crashed.mkdir()
        for f in tmp_path.iterdir():  # the files as a crash would leave them
            if f.is_file():
                shutil.copy2(f, crashed / f.name)

    async with running(crashed, Bus(crashed), engine=restored_engine) as (service, store):
        peer.service = service
        peer.events.clear()
        assert peer.client.send_dpd(tid, time.monotonic())
        peer.pump()
        assert peer.client.rekey_child(tid, time.monotonic())
        peer.pump()
        assert [e for e in peer.events if isinstance(e, ChildSaInstalled)], peer.events
        assert not [e for e in peer.events if isinstance(e, IkeSaDeleted | IkeSaEstablished)]
        (sa,) = service.engine.ike_sas(tid)
        assert (sa.peer_next, sa.our_next) == (7, 1)


class PumpTransport:
    """The seams of IkeTransport the service uses after start: ``call`` and
    ``hold`` (the peer here is pumped at once: holds are awaited and kept)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.holds: list[asyncio.Task[Any]] = []

    def call(self, func: Any, *args: Any) -> Any:
        result = func(*args, time.monotonic())
        self.peer.pump()
        return result

    def hold(self, until: Any) -> None:
        self.holds.append(asyncio.get_running_loop().create_task(until))


async def test_our_rekey_deletes_old_sa_once_every_worker_has_the_new_one(
    tmp_path: Path,
) -> None:
    """Make-before-break for a rekey control starts: the old Child SA is
    deleted with the peer only after the bus reports the new one applied on
    every worker — well before the engine's rekey_delete_delay bound."""
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    service.engine = IkeEngine(ike_config(service), service.lookup)
    worker = bus.subscriber()
    worker.start()
    try:
        assert await asyncio.to_thread(worker.ready.wait, 5)
        token = add_token(store, ACCT)
        base = f"/accounts/{ACCT}/magic/ipsec_tunnels"
        tid = (await api(service, token, "POST", base, ipsec()))["id"]
        psk = (await api(service, token, "POST", f"{base}/{tid}/psk_generate"))["psk"]
        peer = Peer(service)
        peer.connect(tid, psk, "fqdn")
        service.transport = PumpTransport(peer)
        (first,) = [e for e in peer.events if isinstance(e, ChildSaInstalled)]

        assert service.engine.rekey_child(tid, time.monotonic())
        peer.pump()
        installed = [e for e in peer.events if isinstance(e, ChildSaInstalled)]
        assert len(installed) == 2
        # Old and new side by side until the worker has applied the new pair.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if [e for e in peer.events if isinstance(e, ChildSaDeleted)]:
                break
            await asyncio.sleep(0.02)
        (gone,) = [e for e in peer.events if isinstance(e, ChildSaDeleted)]
        assert gone.inbound_spi == first.inbound.spi
        assert time.monotonic() < deadline  # not the rekey_delete_delay fallback
        new_out = installed[1].inbound.spi  # the peer's inbound = our outbound
        assert worker.state.get(f"sa/out/{tid}/{new_out:08x}") is not None
        sas = [k for k in service.publisher.items() if k.startswith("sa/")]
        assert len(sas) == 2
    finally:
        service.transport = None
        worker.stop()
        await service.stop()
        store.close()


async def test_ike_drop_reasons_are_exported(tmp_path: Path) -> None:
    """The engine's drop counter (bounded trigger names) reaches /metrics."""
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    service.engine = IkeEngine(ike_config(service), service.lookup)
    try:
        before = service.metrics.render().decode()
        assert "anywan_control_ike_dropped_messages_total{" not in before
        for _ in range(3):
            service.engine.receive_datagram(b"\x01" * 12, SERVER, CLIENT, time.monotonic())
        text = service.metrics.render().decode()
        (line,) = [
            ln
            for ln in text.splitlines()
            if ln.startswith("anywan_control_ike_dropped_messages_total{")
        ]
        assert line.endswith(" 3.0"), line
        reason = line.split('reason="', 1)[1].split('"', 1)[0]
        assert service.engine.drops[reason] == 3
    finally:
        await service.stop()
        store.close()
