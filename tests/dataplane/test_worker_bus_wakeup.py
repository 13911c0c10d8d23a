"""The bus thread wakes the worker's loop through a pipe, one byte per burst
of records. A wake-up lost there is silent and permanent: records pile up in
the queue, unapplied, while the bus itself looks healthy (this is how a
rekey's new SA once never reached a worker)."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from dataplane import worker as worker_mod
from dataplane.worker import Worker, WorkerConfig
from replication.records import Direction

from ._worker_records import route, sa, tunnel


@pytest.fixture
def w(tmp_path: Path) -> Worker:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    w = Worker(WorkerConfig(anycast="192.0.2.1", run_dir=run_dir, metrics_port=0))
    w._sync_account = lambda account: None  # type: ignore[method-assign]  # no TUN here
    return w


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_record_queued_while_the_loop_drains_the_pipe_still_wakes_it_later(
    w: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bus thread queues a record at the worst moment: while the loop is
    emptying the pipe. That record must be applied, and so must the next one,
    queued after the drain finished: its wake-up has to reach the pipe."""
    t1, t2 = tunnel(1), tunnel(2)
    real_read = os.read
    raced: list[bool] = []

    def read_racing(fd: int, n: int) -> bytes:
        if fd == w._wake_r and not raced:
            raced.append(True)
            w._on_set(t1.key, t1)  # the bus thread, between two loop steps
        return real_read(fd, n)

    w._on_set(route(1, "10.2.0.0/24", 1).key, route(1, "10.2.0.0/24", 1))
    assert readable(w._wake_r)
    monkeypatch.setattr(worker_mod.os, "read", read_racing)
    w._drain_events()
    monkeypatch.setattr(worker_mod.os, "read", real_read)
    assert raced and t1.tunnel_id in w.dp.sad.tunnels

    w._on_set(t2.key, t2)
    assert readable(w._wake_r), "the wake-up for the next record was lost"
    w._drain_events()
    assert t2.tunnel_id in w.dp.sad.tunnels


def test_many_records_one_wakeup_all_applied(w: Worker) -> None:
    recs = [tunnel(n) for n in range(1, 6)]
    for r in recs:
        w._on_set(r.key, r)
    assert len(os.read(w._wake_r, 4096)) == 1  # one byte for the burst
    w._drain_events()
    assert all(r.tunnel_id in w.dp.sad.tunnels for r in recs)
    w._on_set(tunnel(9).key, tunnel(9))
    assert readable(w._wake_r)


def test_only_tunnels_and_routes_resync_the_account_tun(w: Worker) -> None:
    """A TUN sync is netlink work in the account's namespace (~7 ms, a fork in
    pyroute2) that stalls the packet loop: SA records, which never change the
    TUN's addresses or routes, must not cause one (an IKE_AUTH storm of 1000
    tunnels would stall every worker for seconds)."""
    synced: list[str] = []
    w._sync_account = synced.append  # type: ignore[method-assign]
    t = tunnel(1)
    w._on_set(t.key, t)
    w._drain_events()
    assert synced == [t.account_id]
    for rec in (sa(0x1001, Direction.IN), sa(0x2001, Direction.OUT)):
        w._on_set(rec.key, rec)
    w._drain_events()
    assert synced == [t.account_id]  # no new sync for the SAs
    assert 0x1001 in w.dp.sad.inbound
    w._on_delete(sa(0x1001, Direction.IN).key)
    w._drain_events()
    assert synced == [t.account_id] and 0x1001 not in w.dp.sad.inbound
    r = route(1, "10.9.0.0/24", 1)
    w._on_set(r.key, r)
    w._drain_events()
    assert synced == [t.account_id, t.account_id]


def test_a_bus_batch_is_confirmed_only_after_the_loop_applied_it(w: Worker) -> None:
    """The bus acks (control's "applied everywhere", which holds back an IKE
    answer) must mean this loop can use the records: the batch token goes
    back to the subscriber after the records and the TUN fix-up, not when the
    bus thread queued them."""
    order: list[str] = []

    class Sub:
        ready = None

        def confirm(self, token: object) -> None:
            order.append(f"confirm {token}")

    w._subscriber = Sub()
    w._sync_account = lambda account: order.append(f"sync {account}")  # type: ignore[method-assign]
    t1 = tunnel(1)
    w._on_set(t1.key, t1)
    w._on_bus_batch((7, 41))
    assert order == []  # queued, not applied: nothing to confirm yet
    w._drain_events()
    assert t1.tunnel_id in w.dp.sad.tunnels
    assert order == [f"sync {t1.account_id}", "confirm (7, 41)"]
    w._drain_events()  # nothing new: no second confirmation
    assert order[-1] == "confirm (7, 41)" and len(order) == 2
