"""Workers' reports (on the bus acks) summed into ``/sas`` packets/bytes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import zmq

from control.ike.events import ChildSaInstalled
from control.service import SaCounterLedger, sum_sa_counters
from replication.records import Direction
from replication.subscriber import Subscriber
from tests.control.api_support import add_token, ipsec
from tests.control.test_service import ACCT, Bus, api, sa, start, wait_for


def test_sum_skips_garbage_entries() -> None:
    reports = [
        {"in": {1: [2, 20], 2: "x", "3": [1, 1]}, "out": {"t": {5: [1, 100]}, 7: {5: [1, 1]}}},
        {"in": {1: [3, 30], 4: [-1, 0], 6: [True, 1]}, "out": {"t": {5: [2, 200, 9]}}},
        "not a map",
        {"in": [1, 2], "out": None},
    ]
    assert sum_sa_counters(reports) == {("", 1): [5, 50], ("t", 5): [1, 100]}


def test_ledger_never_goes_backwards() -> None:
    """A worker that dies keeps its share; one that restarts (another
    ``life``) or whose SA entry was rebuilt (a counter fell) adds its new
    counts to what it had counted before."""
    led = SaCounterLedger()
    led.observe({"w1": {"life": 1, "in": {7: [10, 1000]}}, "w2": {"life": 5, "in": {7: [4, 400]}}})
    assert led.totals() == {("", 7): [14, 1400]}
    led.observe({"w1": {"life": 1, "in": {7: [12, 1200]}}})  # w2 died: its 4 stay
    assert led.totals() == {("", 7): [16, 1600]}
    led.observe({"w1": {"life": 2, "in": {7: [1, 100]}}})  # w1 restarted
    assert led.totals() == {("", 7): [17, 1700]}
    led.observe({"w1": {"life": 2, "in": {7: [0, 0]}, "out": {"t": {9: [3, 30]}}}})  # entry rebuilt
    assert led.totals() == {("", 7): [17, 1700], ("t", 9): [3, 30]}
    led.observe({"w1": {"life": 2, "in": {7: [2, 200]}, "out": {"t": {9: [5, 50]}}}})
    assert led.totals() == {("", 7): [19, 1900], ("t", 9): [5, 50]}
    led.observe({"w3": "garbage", "w4": {"life": 1, "in": {7: "x"}}})
    assert led.totals() == {("", 7): [19, 1900], ("t", 9): [5, 50]}
    led.keep_only({("t", 9)})  # SA 7 was deleted
    assert led.totals() == {("t", 9): [5, 50]}


async def test_sas_sums_counters_of_every_worker_life(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    second = zmq.curve_keypair()
    service, store = await start(tmp_path, bus)
    service.publisher.allow_client(second[0])  # type: ignore[attr-defined]
    token = add_token(store, ACCT)
    subs: list[Subscriber] = [bus.subscriber()]
    subs.append(
        Subscriber(
            snapshot_endpoint=bus.ep["snap"],
            update_endpoint=bus.ep["upd"],
            ack_endpoint=bus.ep["ack"],
            server_public=bus.server[0],
            client_public=second[0],
            client_secret=second[1],
            worker_id="w2",
            heartbeat_timeout=3.0,
        )
    )
    for s in subs:
        s.start()
    try:
        assert all([await asyncio.to_thread(s.ready.wait, 5.0) for s in subs])
        t = await api(service, token, "POST", f"/accounts/{ACCT}/magic/ipsec_tunnels", ipsec())
        tid = t["id"]
        sin, sout = sa(tid, 0x1000, Direction.IN), sa(tid, 0x2000, Direction.OUT)
        service.on_ike_event(ChildSaInstalled(tid, ACCT, sin, sout, None))
        path = f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}/sas"
        await wait_for(lambda: all(sout.key in s.state for s in subs))
        sas = await api(service, token, "GET", path)
        assert [(c["packets"], c["bytes"]) for c in sas["child_sas"]] == [(None, None)] * 2

        subs[0].set_report({"life": 1, "in": {0x1000: [3, 300]}, "out": {tid: {0x2000: [1, 84]}}})
        subs[1].set_report({"life": 2, "in": {0x1000: [4, 400]}, "out": {tid: {0x2000: [2, 168]}}})

        async def counters() -> list[tuple[int | None, int | None]]:
            doc = await api(service, token, "GET", path)
            return [(c["packets"], c["bytes"]) for c in doc["child_sas"]]

        deadline = asyncio.get_running_loop().time() + 5
        while await counters() != [(7, 700), (3, 252)]:
            assert asyncio.get_running_loop().time() < deadline, await counters()
            await asyncio.sleep(0.05)
        # A worker that leaves keeps its share: counters never go backwards.
        subs[1].stop()
        await wait_for(lambda: len(service.publisher.reports()) == 1)  # type: ignore[attr-defined]
        assert await counters() == [(7, 700), (3, 252)]
        # The other one restarts (a new life): it counts from zero, on top.
        subs[0].set_report({"life": 3, "in": {0x1000: [1, 100]}, "out": {tid: {0x2000: [0, 0]}}})
        deadline = asyncio.get_running_loop().time() + 5
        while await counters() != [(8, 800), (3, 252)]:
            assert asyncio.get_running_loop().time() < deadline, await counters()
            await asyncio.sleep(0.05)
    finally:
        for s in subs:
            s.stop()
        await service.stop()


async def test_checkpoints_published_never_lowered_and_collected(tmp_path: Path) -> None:
    """Owners' reserved sequences become ``seq/`` records on the bus (only for
    replay-protected SAs control published), the highest wins, and they go
    when the SA goes."""
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
        sin, sout = sa(tid, 0x1000, Direction.IN), sa(tid, 0x2000, Direction.OUT)
        service.on_ike_event(ChildSaInstalled(tid, ACCT, sin, sout, None))
        key = f"seq/{tid}/00002000"
        # A report naming an SA control never published is ignored.
        sub.set_report({"seq": {tid: {0x2000: 5000, 0x7777: 9}, "f" * 32: {0x2000: 1}}})
        await wait_for(lambda: service.publish_checkpoints() > 0 or key in sub.state)
        await wait_for(lambda: key in sub.state)
        assert sub.state[key].next_seq == 5000  # type: ignore[attr-defined]
        assert [k for k in sub.state if k.startswith("seq/")] == [key]
        sub.set_report({"seq": {tid: {0x2000: 10}}})  # lower: ignored
        await asyncio.sleep(0.8)
        assert service.publish_checkpoints() == 0
        assert sub.state[key].next_seq == 5000  # type: ignore[attr-defined]
        # The periodic loop publishes a higher one by itself.
        sub.set_report({"seq": {tid: {0x2000: 7000}}})
        await wait_for(lambda: sub.state[key].next_seq == 7000)  # type: ignore[attr-defined]
        await api(service, token, "DELETE", f"/accounts/{ACCT}/magic/ipsec_tunnels/{tid}")
        service.publish_checkpoints()
        await wait_for(lambda: key not in sub.state)
    finally:
        sub.stop()
        await service.stop()
