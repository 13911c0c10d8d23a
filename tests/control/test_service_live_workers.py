"""Control replicates the live worker set (``worker/<node>/<index>``) and the
inbound replay-window checkpoints (``rwin/<spi>``) from the workers' bus
reports (DESIGN §5), through a real publisher and subscribers."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

from control.ike.events import ChildSaInstalled
from control.service import live_worker_records, max_replay_tops
from replication.records import Direction, ReplayCheckpoint, WorkerRecord
from replication.subscriber import Subscriber
from tests.control.api_support import add_token, ipsec
from tests.control.test_service import ACCT, Bus, api, sa, start, wait_for

KEY = os.urandom(32)


def test_live_worker_records_from_untrusted_reports() -> None:
    reports = {
        "node1/0": {"handoff": ["10.99.0.11", 40000, KEY]},
        "node2/3": {"handoff": ("10.99.0.12", 40001, KEY)},
        "node1/1": {"handoff": ["10.99.0.11", 0, KEY]},  # bad port
        "node1/2": {"handoff": ["10.99.0.11", 40002, b"short"]},
        "nodeX/x": {"handoff": ["10.99.0.11", 40003, KEY]},  # index not a number
        "bad node/4": {"handoff": ["10.99.0.11", 40004, KEY]},
        "node3/5": {"handoff": ["10.99.0.11", 40005]},
        "node3/6": {"in": {}},  # no handoff: not an election candidate
        "node3/7": "not a map",
    }
    got = live_worker_records(reports)
    assert sorted(got) == ["worker/node1/0", "worker/node2/3"]
    assert got["worker/node2/3"] == WorkerRecord("node2", 3, "10.99.0.12", 40001, KEY)


def test_max_replay_tops_skips_garbage() -> None:
    reports = [
        {"rwin": {0x1000: 5, 0x1001: 0, 0x1002: 1 << 32, "x": 3}},
        {"rwin": {0x1000: 9, 0x1003: True}},
        {"rwin": [1, 2]},
        None,
    ]
    assert max_replay_tops(reports) == {0x1000: 9}


async def test_worker_records_follow_the_live_subscribers(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    service, _ = await start(tmp_path, bus)
    a = bus.subscriber()  # worker id "w1": not <node>/<index>, never a record
    subs = [a]
    try:
        b = Subscriber(
            snapshot_endpoint=bus.ep["snap"],
            update_endpoint=bus.ep["upd"],
            ack_endpoint=bus.ep["ack"],
            server_public=bus.server[0],
            client_public=bus.client[0],
            client_secret=bus.client[1],
            worker_id="n2/1",
            heartbeat_timeout=3.0,
        )
        subs.append(b)
        for s in subs:
            s.start()
        assert all([await asyncio.to_thread(s.ready.wait, 5.0) for s in subs])
        a.set_report({"handoff": ["10.99.0.11", 40000, KEY]})
        b.set_report({"handoff": ["10.99.0.12", 40001, KEY]})
        key = "worker/n2/1"
        await wait_for(lambda: key in a.state, 5)
        assert a.state[key] == WorkerRecord("n2", 1, "10.99.0.12", 40001, KEY)
        assert [k for k in a.state if k.startswith("worker/")] == [key]
        assert service.metrics.live_workers_published._value.get() == 1  # type: ignore[attr-defined]
        # A restarted worker (new port and key) replaces its record.
        key2 = os.urandom(32)
        b.set_report({"handoff": ["10.99.0.12", 40009, key2]})
        await wait_for(lambda: a.state[key].handoff_port == 40009, 5)  # type: ignore[union-attr]
        assert a.state[key].handoff_key == key2  # type: ignore[union-attr]
        # A worker that stops acking goes after the publisher's subscriber timeout.
        b.stop()
        await wait_for(lambda: key not in a.state, 8)
    finally:
        for s in subs:
            s.stop()
        await service.stop()


async def test_replay_window_checkpoints(tmp_path: Path) -> None:
    """The highest reported top of an inbound SA with a window is published,
    never lowered, only for SAs control published, and goes with the SA."""
    bus = Bus(tmp_path)
    service, store = await start(tmp_path, bus)
    token = add_token(store, ACCT)
    sub = bus.subscriber()
    sub.start()
    try:
        assert await asyncio.to_thread(sub.ready.wait, 5.0)
        body = {**ipsec(), "replay_protection": True}
        t = await api(service, token, "POST", f"/accounts/{ACCT}/magic/ipsec_tunnels", body)
        tid = t["id"]
        sin = replace(sa(tid, 0x1000, Direction.IN), replay_window=128)
        sout = sa(tid, 0x2000, Direction.OUT)
        service.on_ike_event(ChildSaInstalled(tid, ACCT, sin, sout, None))
        no_window = sa(tid, 0x1001, Direction.IN)  # replay_window 0: never checkpointed
        service.publisher.set(no_window)
        key = "rwin/00001000"
        sub.set_report({"rwin": {0x1000: 500, 0x1001: 7, 0x7777: 9}})
        await wait_for(lambda: key in sub.state)
        assert sub.state[key] == ReplayCheckpoint(ACCT, tid, 0x1000, 500)
        assert [k for k in sub.state if k.startswith("rwin/")] == [key]
        sub.set_report({"rwin": {0x1000: 20}})  # lower: ignored
        await asyncio.sleep(0.8)
        assert service.publish_checkpoints() == 0
        assert sub.state[key].top == 500  # type: ignore[union-attr]
        sub.set_report({"rwin": {0x1000: 900}})
        await wait_for(lambda: sub.state[key].top == 900)  # type: ignore[union-attr]
        await api(service, token, "DELETE", f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}")
        service.publish_checkpoints()
        await wait_for(lambda: key not in sub.state)
    finally:
        sub.stop()
        await service.stop()
