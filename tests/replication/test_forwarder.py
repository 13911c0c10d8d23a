"""A forwarder with workers behind it: same state, same sequences, acks reach control."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from replication.forwarder import Forwarder
from replication.subscriber import Subscriber
from tests.replication.conftest import (
    Bus,
    Keys,
    Recorder,
    converged,
    make_route,
    make_sa,
    make_tunnel,
    wait_until,
)


@pytest.fixture
def forwarder(tcp_bus: Bus, keys: Keys, tmp_path: Path) -> Iterator[Forwarder]:
    """Upstream over tcp (another node), downstream over ipc (this node's workers)."""
    pub = tcp_bus.publisher(heartbeat_interval=0.05)
    pub.set(make_tunnel(1))
    upstream = (pub.snapshot_endpoint, pub.update_endpoint, pub.ack_endpoint)
    fwd = make_forwarder(keys, tmp_path, upstream, "node-a")
    try:
        yield fwd
    finally:
        fwd.stop()


def make_forwarder(
    keys: Keys, tmp_path: Path, upstream: tuple[str, str, str], node: str
) -> Forwarder:
    """A started forwarder for ``upstream``, serving local workers 0 and 1 over ipc."""
    fwd = Forwarder(
        upstream_snapshot=upstream[0],
        upstream_update=upstream[1],
        upstream_ack=upstream[2],
        server_public=keys.server[0],
        client_public=keys.clients[3][0],
        client_secret=keys.clients[3][1],
        worker_id=node,
        snapshot_endpoint=f"ipc://{tmp_path}/fwd-snap",
        update_endpoint=f"ipc://{tmp_path}/fwd-upd",
        ack_endpoint=f"ipc://{tmp_path}/fwd-ack",
        local_public=keys.server[0],
        local_secret=keys.server[1],
        allowed_clients=[keys.clients[0][0], keys.clients[1][0]],
        heartbeat_interval=0.05,
        heartbeat_timeout=0.5,
    )
    fwd.start()
    return fwd


def local_worker(fwd: Forwarder, keys: Keys, n: int, rec: Recorder, **kw: Any) -> Subscriber:
    sub = Subscriber(
        snapshot_endpoint=fwd.snapshot_endpoint,
        update_endpoint=fwd.update_endpoint,
        ack_endpoint=fwd.ack_endpoint,
        server_public=keys.server[0],
        client_public=keys.clients[n][0],
        client_secret=keys.clients[n][1],
        worker_id=f"node-a/w{n}",
        on_set=rec.on_set,
        on_delete=rec.on_delete,
        heartbeat_timeout=0.5,
        **kw,
    )
    sub.start()
    return sub


def test_two_workers_behind_a_forwarder(tcp_bus: Bus, keys: Keys, forwarder: Forwarder) -> None:
    pub = tcp_bus.started[0]
    recs = [Recorder(), Recorder()]
    workers = [local_worker(forwarder, keys, i, recs[i]) for i in range(2)]
    try:
        assert all(w.ready.wait(3) for w in workers)
        assert wait_until(lambda: converged(pub, *workers))  # type: ignore[arg-type]
        seqs = [pub.set(make_sa(0x9000 + i)) for i in range(20)]  # type: ignore[union-attr]
        pub.delete(make_tunnel(1).key)  # type: ignore[union-attr]
        assert wait_until(lambda: converged(pub, *workers))  # type: ignore[arg-type]
        # The upstream sequence is preserved end to end.
        assert all(w.applied_seq == pub.sequence for w in workers)  # type: ignore[union-attr]
        assert all(w.epoch == pub.epoch for w in workers)  # type: ignore[union-attr]
        # Control sees the workers' own acks through the forwarder.
        names = {s.worker_id for s in pub.subscribers()}  # type: ignore[union-attr]
        assert {"node-a/w0", "node-a/w1"} <= names
        assert pub.wait_applied_sync(seqs[-1], timeout=3)  # type: ignore[union-attr]
        for r in recs:
            assert all(n == 1 for n in r.sets.values()) and r.deletes == {make_tunnel(1).key: 1}
        # Upstream loss: the forwarder resyncs, and its workers follow.
        pub.inject_loss(1)  # type: ignore[union-attr]
        pub.set(make_route(5))  # type: ignore[union-attr]
        pub.set(make_route(6))  # type: ignore[union-attr]
        assert wait_until(lambda: converged(pub, *workers))  # type: ignore[arg-type]
        assert forwarder.registry.get_sample_value("anywan_bus_gaps_total") == 1
    finally:
        for w in workers:
            w.stop()


def test_forwarder_keeps_serving_through_control_restart(
    tcp_bus: Bus, keys: Keys, forwarder: Forwarder
) -> None:
    pub = tcp_bus.started[0]
    records = [make_tunnel(1), *(make_sa(0xA000 + i) for i in range(10))]
    for r in records[1:]:
        pub.set(r)  # type: ignore[union-attr]
    rec = Recorder()
    worker = local_worker(forwarder, keys, 0, rec)
    try:
        assert wait_until(lambda: converged(pub, worker))  # type: ignore[arg-type]
        tcp_bus.stop(pub)  # type: ignore[arg-type]
        assert wait_until(lambda: len(worker.state) == 11, timeout=1)
        pub2 = tcp_bus.publisher(heartbeat_interval=0.05, initial=records)
        assert wait_until(lambda: worker.epoch == pub2.epoch and converged(pub2, worker))
        assert not rec.deletes and sum(rec.sets.values()) == 11
    finally:
        worker.stop()


def test_forwarder_started_before_control_answers_each_worker_once(
    keys: Keys, tmp_path: Path
) -> None:
    """Workers re-request a snapshot every timeout while the forwarder has
    none to give; when control comes up, only each worker's newest request
    is served, not one snapshot per retry."""
    up = tuple(f"ipc://{tmp_path}/up-{n}" for n in ("snap", "upd", "ack"))
    fwd = make_forwarder(keys, tmp_path, up, "node-b")  # type: ignore[arg-type]
    bus = Bus(keys, up)  # type: ignore[arg-type]
    worker = local_worker(
        fwd, keys, 0, Recorder(), snapshot_timeout=0.05, registry=CollectorRegistry()
    )

    def retries() -> float:
        name, labels = "anywan_bus_snapshot_requests_total", {"reason": "snapshot_timeout"}
        return worker.metrics.registry.get_sample_value(name, labels) or 0.0

    try:
        assert wait_until(lambda: retries() >= 5, timeout=3)
        pub = bus.publisher(heartbeat_interval=0.05)
        pub.set(make_tunnel(1))
        assert wait_until(lambda: converged(pub, worker), timeout=5)
        served = fwd.registry.get_sample_value("anywan_bus_snapshots_served_total")
        assert served is not None and served <= 2, served
    finally:
        worker.stop()
        fwd.stop()
        bus.close()
