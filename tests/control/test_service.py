"""control/service.py against the real bus: a real Publisher and a real
Subscriber (a stand-in worker) over CURVE ipc sockets, the real SQLite store.

Covers the IKE glue (engine events → records, make-before-break on rekeys,
tombstones), the engine's tunnel lookup, tunnel deletion → engine + tombstones,
and a control restart that keeps SA records on the bus without churn."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import zmq

from control.config import ControlConfig
from control.ike.engine import PeerIdentity
from control.ike.events import (
    AuthenticationFailed,
    ChildSaDeleted,
    ChildSaInstalled,
    IkeSaDeleted,
    IkeSaEstablished,
)
from control.metrics import ControlMetrics
from control.secrets import MasterKey
from control.service import ControlService
from control.store import Store
from replication.publisher import Publisher
from replication.records import Cipher, Direction, Integ, SaRecord, TrafficSelector
from replication.subscriber import Subscriber
from tests.control.api_support import add_token, ipsec

ACCT = "acct-a"


class Bus:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.server = zmq.curve_keypair()
        self.client = zmq.curve_keypair()
        d = state / "bus"
        d.mkdir(exist_ok=True)
        self.ep = {k: f"ipc://{d}/{k}" for k in ("snap", "upd", "ack")}

    def factory(self, registry: Any) -> Any:
        def make(initial: list[Any]) -> Publisher:
            return Publisher(
                snapshot_endpoint=self.ep["snap"],
                update_endpoint=self.ep["upd"],
                ack_endpoint=self.ep["ack"],
                server_public=self.server[0],
                server_secret=self.server[1],
                allowed_clients=[self.client[0]],
                heartbeat_interval=0.5,
                initial=initial,
                registry=registry,
            )

        return make

    def subscriber(self, **kw: Any) -> Subscriber:
        return Subscriber(
            snapshot_endpoint=self.ep["snap"],
            update_endpoint=self.ep["upd"],
            ack_endpoint=self.ep["ack"],
            server_public=self.server[0],
            client_public=self.client[0],
            client_secret=self.client[1],
            worker_id="w1",
            heartbeat_timeout=3.0,
            **kw,
        )


class FakeEngine:
    """Stands in for IkeEngine at the one seam the service drives directly."""

    def __init__(self) -> None:
        self.deleted: list[str] = []

    def delete_tunnel(self, tunnel_id: str, now: float) -> None:
        self.deleted.append(tunnel_id)

    def next_event(self) -> None:
        return None


def sa(tunnel_id: str, spi: int, direction: Direction, gen: int = 0, key: bytes = b"") -> SaRecord:
    return SaRecord(
        account_id=ACCT,
        tunnel_id=tunnel_id,
        spi=spi,
        direction=direction,
        local_addr="203.0.113.1",
        remote_addr="198.51.100.10",
        udp_encap=False,
        local_port=0,
        remote_port=0,
        cipher=Cipher.AES128GCM16,
        integ=Integ.NONE,
        enc_key=key or os.urandom(16),
        salt=os.urandom(4),
        integ_key=b"",
        replay_window=0,
        ts_local=(TrafficSelector.from_network("0.0.0.0/0"),),
        ts_remote=(TrafficSelector.from_network("0.0.0.0/0"),),
        child_id=1,
        generation=gen,
        created=time.time(),
        rekey_at=time.time() + 3600,
        expire_at=time.time() + 4000,
    )


async def start(
    state: Path, bus: Bus, *, engine: Callable[[ControlService], Any] | None = None
) -> tuple[ControlService, Store]:
    """A started control service; ``engine(service)`` gives its IKE engine
    (set before start), a :class:`FakeEngine` by default."""
    store = Store.open(state, MasterKey.load_or_create(state / "master.key"))
    metrics = ControlMetrics()
    conf = ControlConfig(state_dir=state, api_listen="127.0.0.1:0", rekey_apply_timeout=5.0)
    service = ControlService(conf, store, bus.factory(metrics.registry), metrics=metrics)
    service.engine = engine(service) if engine is not None else FakeEngine()
    await service.start()
    return service, store


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def api(service: ControlService, token: str, method: str, path: str, body: Any = None) -> Any:
    url = f"http://127.0.0.1:{service.bound_ports[0]}{path}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        doc = await r.json()
        assert r.status == 200, doc
        return doc["result"]


async def test_ike_glue_make_before_break_and_restart(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    token = add_token(store, ACCT)
    order: list[tuple[str, str]] = []
    gate = threading.Event()
    gate.set()

    def on_set(key: str, rec: Any) -> None:
        gate.wait(2.0)
        order.append(("set", key))

    def on_delete(key: str, rec: Any) -> None:
        order.append(("del", key))

    sub = bus.subscriber(on_set=on_set, on_delete=on_delete)
    sub.start()
    try:
        assert await asyncio.to_thread(sub.ready.wait, 5.0)
        t = await api(service, token, "POST", f"/accounts/{ACCT}/magic/ipsec_tunnels", ipsec())
        tid = t["id"]
        await wait_for(lambda: f"tunnel/{tid}" in sub.state)

        # First Child SA.
        in0, out0 = sa(tid, 0x1000, Direction.IN), sa(tid, 0x2000, Direction.OUT)
        service.on_ike_event(
            IkeSaEstablished(
                tid,
                ACCT,
                1,
                2,
                False,
                ("203.0.113.1", 500),
                ("198.51.100.10", 500),
                False,
                False,
                "fqdn",
                "aes256gcm16-prfsha384-ecp384",
            )
        )
        service.on_ike_event(ChildSaInstalled(tid, ACCT, in0, out0, None))
        await wait_for(lambda: in0.key in sub.state and out0.key in sub.state)
        assert sub.state[in0.key] == in0  # keys arrive intact at the worker

        sas = await api(service, token, "GET", f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}/sas")
        assert [c["spi"] for c in sas["child_sas"]] == ["0x00001000", "0x00002000"]
        assert sas["ike_sas"][0]["proposal"] == "aes256gcm16-prfsha384-ecp384"
        assert in0.enc_key.hex() not in str(sas) and out0.salt.hex() not in str(sas)

        # Rekey while the worker is slow to apply: the old SA must stay on the
        # bus until the worker acknowledged the new one.
        gate.clear()
        in1, out1 = sa(tid, 0x1001, Direction.IN, 1), sa(tid, 0x2001, Direction.OUT, 1)
        service.on_ike_event(ChildSaInstalled(tid, ACCT, in1, out1, (0x1000, 0x2000)))
        service.on_ike_event(
            ChildSaDeleted(tid, ACCT, 0x1000, 0x2000, (in0.key, out0.key), "rekeyed")
        )
        await asyncio.sleep(0.4)
        pub = service.publisher
        assert pub.get(in0.key) is not None and pub.get(out0.key) is not None
        assert not pub.applied_everywhere(pub.sequence)
        gate.set()
        await wait_for(lambda: pub.get(in0.key) is None and pub.get(out0.key) is None)
        await wait_for(lambda: in0.key not in sub.state and out0.key not in sub.state)
        # Make-before-break as the worker saw it: both new SAs set before any old one went.
        new_set = max(order.index(("set", in1.key)), order.index(("set", out1.key)))
        old_del = min(order.index(("del", in0.key)), order.index(("del", out0.key)))
        assert new_set < old_del, order
        assert store.get_sealed(in0.key) is None and store.get_sealed(in1.key) is not None

        # A failed authentication is counted, not stored.
        service.on_ike_event(AuthenticationFailed(("198.51.100.99", 500), "bad_auth", "x"))
        text = service.metrics.render().decode()
        assert 'anywan_control_ike_handshakes_total{result="bad_auth"} 1.0' in text
        assert 'anywan_control_ike_handshakes_total{result="ok"} 1.0' in text
        assert 'anywan_control_child_sa_rekeys_total{result="child"} 1.0' in text
        assert 'anywan_control_child_sas{state="installed"} 1.0' in text
        assert 'anywan_control_ike_sas{state="established"} 1.0' in text
        assert "anywan_control_bus_workers 1.0" in text
        assert 'anywan_control_account_sas{account="acct-a",kind="child"} 1.0' in text
        assert 'anywan_control_account_sas{account="acct-a",kind="ike"} 1.0' in text

        # Control restart: the same state comes back; the worker sees no change.
        state_before = dict(sub.state)
        order.clear()
        await service.stop()
        store.close()
        for f in tmp_path.iterdir():
            if f.is_file() and f.name != "master.key":
                data = f.read_bytes()
                for rec in (in1, out1):
                    assert rec.enc_key not in data and rec.salt not in data
        service, store = await start(tmp_path, bus)
        assert service.publisher.get(in1.key) == in1
        assert set(service.publisher.items()) == set(state_before)
        snaps = sub.snapshots
        await wait_for(lambda: sub.snapshots > snaps)  # the worker re-snapshots (new epoch)
        await asyncio.sleep(0.3)
        assert dict(sub.state) == state_before
        assert order == [], order  # nothing was deleted or re-set on the worker
        workers = await api(service, token, "GET", "/workers")
        assert [w["worker_id"] for w in workers["workers"]] == ["w1"]

        # Deleting the tunnel: engine told (DELETE to the peer), SAs and tunnel tombstoned.
        await api(service, token, "DELETE", f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}")
        assert service.engine.deleted == [tid]
        await wait_for(lambda: not sub.state)
        assert store.sealed_items("sa/") == []
        service.on_ike_event(IkeSaDeleted(tid, ACCT, 1, 2, "local_delete"))
    finally:
        sub.stop()
        await service.stop()
        store.close()


async def test_child_sa_deleted_without_rekey_tombstones_at_once(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    try:
        token = add_token(store, ACCT)
        tid = (await api(service, token, "POST", f"/accounts/{ACCT}/magic/ipsec_tunnels", ipsec()))[
            "id"
        ]
        i, o = sa(tid, 0x3000, Direction.IN), sa(tid, 0x4000, Direction.OUT)
        service.on_ike_event(ChildSaInstalled(tid, ACCT, i, o, None))
        assert service.publisher.get(o.key) == o
        service.on_ike_event(
            ChildSaDeleted(tid, ACCT, 0x3000, 0x4000, (i.key, o.key), "peer_delete")
        )
        assert service.publisher.get(i.key) is None and service.publisher.get(o.key) is None
        assert store.sealed_items("sa/") == []
        # A Child SA that completes after its tunnel was deleted is never published.
        gone = "e" * 32
        late = (sa(gone, 0x3001, Direction.IN), sa(gone, 0x4001, Direction.OUT))
        service.on_ike_event(ChildSaInstalled(gone, ACCT, *late, None))
        assert not any(k.startswith("sa/") for k in service.publisher.items())
        assert service.engine.deleted == [gone] and store.sealed_items("sa/") == []
    finally:
        await service.stop()
        store.close()


async def test_lookup_builds_tunnel_auth_from_the_store(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    try:
        tok_a, tok_b = add_token(store, ACCT), add_token(store, "acct-b")
        base = f"/accounts/{ACCT}/magic/ipsec_tunnels"
        t1 = await api(service, tok_a, "POST", base, ipsec("t1", n=0, replay_protection=True))
        t2 = await api(service, tok_a, "POST", base, ipsec("t2", n=1))
        tb = await api(
            service, tok_b, "POST", "/accounts/acct-b/magic/ipsec_tunnels", ipsec("t1", n=1)
        )

        def ident(
            kind: str, account: str | None, tunnel: str | None, addr: str | None = None
        ) -> Any:
            return PeerIdentity(kind, account, tunnel, addr, "203.0.113.1", "198.51.100.10")

        # No PSK yet: nobody authenticates.
        assert service.lookup(ident("fqdn", ACCT, t1["id"])) is None
        psk = (await api(service, tok_a, "POST", f"{base}/{t1['id']}/psk_generate"))["psk"]
        auth = service.lookup(ident("key_id", ACCT, t1["id"]))
        assert auth.psk == psk.encode() and auth.tunnel_id == t1["id"] and auth.account_id == ACCT
        assert auth.replay_protection is True and auth.local_addr == "203.0.113.1"
        assert psk not in repr(auth)
        # A regenerated PSK is what the next negotiation gets.
        psk2 = (await api(service, tok_a, "POST", f"{base}/{t1['id']}/psk_generate"))["psk"]
        assert service.lookup(ident("rfc822", ACCT, t1["id"])).psk == psk2.encode()
        # Another account's tunnel id under this account is unknown.
        assert service.lookup(ident("fqdn", ACCT, tb["id"])) is None
        # ID_IPV4_ADDR: unique pair → found; t2 (198.51.100.11) also exists in acct-b → refused.
        assert service.lookup(ident("ipv4", None, None, "198.51.100.10")).tunnel_id == t1["id"]
        await api(service, tok_a, "POST", f"{base}/{t2['id']}/psk_generate")
        await api(
            service, tok_b, "POST", f"/accounts/acct-b/magic/ipsec_tunnels/{tb['id']}/psk_generate"
        )
        assert service.lookup(ident("ipv4", None, None, "198.51.100.11")) is None
        assert service.lookup(ident("ipv4", None, None, "198.51.100.77")) is None
    finally:
        await service.stop()
        store.close()
