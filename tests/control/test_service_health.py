"""``GET /healthz``: "ok" (200), or "degraded" (503) with the specific problems.

A real control service (real store, real bus on ipc sockets, real aiohttp
server); each problem is provoked once, seen as a 503 whose body conforms to
the OpenAPI document, and cleared again. Thresholds are shortened on the
service instance (``WORKER_GRACE``, ``WORKER_LAG_GRACE``) so the tests wait
seconds, not half a minute."""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control import ctl
from control.api.openapi import build_openapi
from control.config import ControlConfig
from control.ike.engine import IkeEngine
from control.metrics import ControlMetrics
from control.secrets import MasterKey
from control.service import ControlService
from control.store import Store
from replication.publisher import SubscriberStatus
from tests.control.api_support import Control, add_token, control, ipsec  # noqa: F401
from tests.control.test_api_openapi import check, response_schema
from tests.control.test_ctl import run_ctl
from tests.control.test_service import ACCT, Bus, api, start, wait_for
from tests.control.test_service_ike import ike_config
from tests.control.test_service_ike_rows import running

BASE = f"/accounts/{ACCT}/magic/ipsec_tunnels"
DOC = build_openapi()


async def healthz(service: ControlService) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{service.bound_ports[0]}/healthz"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        doc = await r.json()
        check(DOC, response_schema(DOC, "/healthz", "GET", r.status), doc, "GET /healthz")
        return r.status, doc


async def healthy(service: ControlService) -> dict[str, Any]:
    status, doc = await healthz(service)
    health = doc["result"]
    assert status == 200 and doc["success"] and doc["errors"] == [], doc
    assert health["status"] == "ok" and health["problems"] == [], health
    return health


async def degraded(service: ControlService, pattern: str) -> dict[str, Any]:
    """503, status "degraded", exactly one problem, matching ``pattern``."""
    status, doc = await healthz(service)
    health = doc["result"]
    assert status == 503 and not doc["success"], doc
    assert health["status"] == "degraded", health
    (problem,) = health["problems"]
    assert re.fullmatch(pattern, problem), problem
    assert doc["errors"] == [{"code": 1503, "message": problem}]
    return health


def dead_thread() -> threading.Thread:
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return t


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class StubRelay:
    """``RelayServer`` as the IKE transport uses it, with a thread that can die."""

    def __init__(self) -> None:
        self.on_datagram: Any = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self.connected: list[str] = []
        """What ``live_workers()`` reports: the workers whose relay client pings."""

    def live_workers(self) -> list[str]:
        return list(self.connected)

    def start(self) -> None:
        self._halt.clear()
        self._thread = threading.Thread(target=self._halt.wait, daemon=True)
        self._thread.start()

    def crash(self) -> None:
        """The thread ends while the relay is still meant to run (``_thread`` kept)."""
        self._halt.set()
        assert self._thread is not None
        self._thread.join()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def send(self, reply: Any) -> None:
        pass

    @property
    def thread_died(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


async def test_workers_missing_after_the_grace_while_tunnels_exist(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    token = add_token(store, ACCT)
    sub = bus.subscriber()
    try:
        # Just started, nothing configured, no worker: ok (the lab and compose
        # start control first and wait for this 200 before starting workers).
        h = await healthy(service)
        assert h["workers"] == 0 and h["tunnels"] == 0 and h["ike"] == "not configured"
        t1 = await api(service, token, "POST", BASE, ipsec("t1", 1))
        t2 = await api(service, token, "POST", BASE, ipsec("t2", 2))
        assert (await healthy(service))["tunnels"] == 2  # still within the grace
        service.WORKER_GRACE = 0.0  # type: ignore[misc]
        h = await degraded(
            service, r"no worker subscribed to the bus for \d+ s while 2 tunnels are configured"
        )
        assert h["workers"] == 0 and h["tunnels"] == 2

        # A worker subscribes and keeps up with the bus: ok, updates flowing or not.
        sub.start()
        assert await asyncio.to_thread(sub.ready.wait, 5.0)
        await wait_for(lambda: service.health()["workers"] == 1)
        service.WORKER_LAG_GRACE = 0.2  # type: ignore[misc]
        await api(service, token, "PUT", f"{BASE}/{t1['id']}", {"mss": 1300})
        service.health()  # samples the bus sequence: due in WORKER_LAG_GRACE
        await asyncio.sleep(0.5)
        assert (await healthy(service))["workers"] == 1
        assert service.workers()[0]["applied_seq"] == service.publisher.sequence

        # The last worker goes: ok while the grace runs from when it was last
        # seen (a rolling restart), degraded after it.
        service.WORKER_GRACE = 1.5  # type: ignore[misc]
        sub.stop()
        await wait_for(lambda: service.health()["workers"] == 0, 8)
        await healthy(service)
        await asyncio.sleep(1.6)
        await degraded(service, r"no worker subscribed to the bus for \d s while 2 tunnels .*")

        # Nothing to forward: no worker is not a problem.
        await api(service, token, "DELETE", f"{BASE}/{t1['id']}")
        await degraded(service, r".* while 1 tunnel is configured")
        await api(service, token, "DELETE", f"{BASE}/{t2['id']}")
        assert (await healthy(service))["tunnels"] == 0
    finally:
        sub.stop()
        await service.stop()
        store.close()


async def test_a_worker_that_stopped_applying_the_bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    token = add_token(store, ACCT)
    service.WORKER_LAG_GRACE = 0.2  # type: ignore[misc]
    live = SubscriberStatus("node1/0", applied_seq=0, last_seen=0.0, lag=0, live=True)
    statuses = [live]
    monkeypatch.setattr(service.publisher, "subscribers", lambda: list(statuses))
    try:
        await api(service, token, "POST", BASE, ipsec("t1", 1))
        seq = service.publisher.sequence
        # Just published: no worker has to have it yet.
        await healthy(service)
        await asyncio.sleep(0.3)
        h = await degraded(
            service,
            rf"worker node1/0 has not applied bus updates published 0 s ago "
            rf"\(applied 0, bus at {seq}\)",
        )
        assert h["workers"] == 1
        # It catches up: ok.
        statuses[0] = replace(live, applied_seq=seq)
        await healthy(service)
        # Many lagging workers: the first few named, the rest counted.
        statuses[:] = [replace(live, worker_id=f"node{i}/0") for i in range(7)]
        _, doc = await healthz(service)
        problems = doc["result"]["problems"]
        assert len(problems) == ControlService.MAX_LISTED + 1
        assert problems[-1] == "2 more workers lagging the same way"
    finally:
        monkeypatch.undo()
        await service.stop()
        store.close()


async def test_ike_not_listening_and_relay_thread_gone(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    store = Store.open(tmp_path, MasterKey.load_or_create(tmp_path / "master.key"))
    metrics = ControlMetrics()
    p500, p4500 = free_udp_ports(2)
    conf = ControlConfig(
        state_dir=tmp_path,
        api_listen="127.0.0.1:0",
        ike_listen=("127.0.0.1",),
        ike_ports=(str(p500), str(p4500)),
    )
    relay = StubRelay()
    service = ControlService(
        conf, store, bus.factory(metrics.registry), metrics=metrics, relay=relay
    )
    service.engine = IkeEngine(ike_config(service), service.lookup)
    await service.start()
    try:
        assert (await healthy(service))["ike"] == "running"
        transport, service.transport = service.transport, None
        h = await degraded(
            service,
            rf"IKE not listening \(udp/{p500}, udp/{p4500} on 127\.0\.0\.1; the worker relay\)",
        )
        assert h["ike"] == "not listening"
        service.transport = transport
        await healthy(service)

        relay.crash()
        h = await degraded(
            service, r"IKE relay not running \(workers cannot forward IKE to control\)"
        )
        assert h["ike"] == "running"  # the UDP listeners still are
        relay.start()
        await healthy(service)
    finally:
        await service.stop()
        store.close()


async def test_bus_publisher_thread_gone(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    pub: Any = service.publisher
    try:
        await healthy(service)
        alive, pub._thread = pub._thread, dead_thread()
        await degraded(service, "bus publisher not running")
        pub._thread = alive
        await healthy(service)
    finally:
        await service.stop()
        store.close()


async def test_store_not_writable_then_not_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The once-a-second IKE state sweep opens a write transaction: when the
    store refuses it, /healthz says so (the class, not the message), and the
    next sweep that succeeds clears it."""
    async with running(tmp_path, Bus(tmp_path)) as (service, store):
        await healthy(service)

        def refuse() -> Any:
            raise sqlite3.OperationalError("database is locked by /secret/path")

        monkeypatch.setattr(store, "transaction", refuse)
        with pytest.raises(sqlite3.OperationalError):
            service.sweep_ike_state()
        h = await degraded(
            service, r"store not writable: OperationalError \(a write failed \d+ s ago\)"
        )
        assert "secret" not in str(h)
        monkeypatch.undo()
        service.sweep_ike_state()
        await healthy(service)

        def unreadable(kind: str) -> int:
            raise sqlite3.DatabaseError("file is not a database")

        monkeypatch.setattr(store, "count", unreadable)
        h = await degraded(service, "store not readable: DatabaseError")
        assert h["tunnels"] is None
        monkeypatch.undo()
        await healthy(service)


async def test_anywanctl_status_prints_the_problems(
    control: Control,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    pub: Any = control.service.publisher
    rc, out, _ = await run_ctl(control, capsys, "status")
    assert rc == ctl.EXIT_OK and out.startswith("control: ok")
    alive, pub._thread = pub._thread, dead_thread()
    try:
        rc, out, err = await run_ctl(control, capsys, "status")
        assert rc == ctl.EXIT_DEGRADED, err
        assert out.startswith("control: degraded")
        assert "  problem: bus publisher not running" in out.splitlines()
        rc, out, _ = await run_ctl(control, capsys, "--json", "status")
        assert rc == ctl.EXIT_DEGRADED
        assert '"bus publisher not running"' in out
    finally:
        pub._thread = alive
    rc, out, _ = await run_ctl(control, capsys, "status")
    assert rc == ctl.EXIT_OK


async def test_workers_on_the_bus_but_none_on_the_ike_relay(tmp_path: Path) -> None:
    """A worker whose relay endpoint or key is wrong is live on the bus and
    carries traffic, but no peer's IKE reaches control: degraded after the
    grace while IPsec tunnels exist, ok again once a worker connects."""
    bus = Bus(tmp_path)
    store = Store.open(tmp_path, MasterKey.load_or_create(tmp_path / "master.key"))
    metrics = ControlMetrics()
    conf = ControlConfig(state_dir=tmp_path, api_listen="127.0.0.1:0")
    relay = StubRelay()
    service = ControlService(
        conf, store, bus.factory(metrics.registry), metrics=metrics, relay=relay
    )
    service.engine = IkeEngine(ike_config(service), service.lookup)
    await service.start()
    sub = bus.subscriber()
    try:
        token = add_token(store, ACCT)
        await api(service, token, "POST", BASE, ipsec("t1", 1))
        sub.start()
        assert await asyncio.to_thread(sub.ready.wait, 5.0)
        await wait_for(lambda: service.health()["workers"] == 1)
        await healthy(service)  # within the grace
        service.WORKER_GRACE = 0.0  # type: ignore[misc]
        h = await degraded(
            service,
            r"no worker connected to the IKE relay for \d+ s while 1 IPsec tunnel is "
            r"configured and 1 worker is on the bus",
        )
        assert h["ike"] == "running"
        relay.connected = ["node1/0"]
        await healthy(service)
    finally:
        sub.stop()
        await service.stop()
        store.close()
