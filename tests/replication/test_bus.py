"""Publisher and subscribers over real CURVE sockets (tcp on loopback and ipc)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from replication import clone
from replication.publisher import Publisher
from replication.records import SCHEMA, Record, encode
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


def sample(metric_registry: object, name: str, **labels: str) -> float:
    value = metric_registry.get_sample_value(name, labels or None)  # type: ignore[attr-defined]
    return float(value or 0.0)


def test_late_subscriber_gets_snapshot_then_updates(bus: Bus) -> None:
    pub = bus.publisher()
    for i in range(50):
        pub.set(make_sa(0x1000 + i))
    pub.set(make_tunnel(1))
    pub.delete(make_sa(0x1000).key)
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec)
    assert sub.ready.wait(3)
    assert wait_until(lambda: converged(pub, sub))
    assert len(sub.state) == 50
    assert sub.applied_seq == pub.sequence
    seq = pub.set(make_route(7))
    assert wait_until(lambda: sub.applied_seq >= seq)
    assert sub.state[make_route(7).key] == make_route(7)
    # Every record arrived exactly once, through the snapshot or the stream.
    assert all(n == 1 for n in rec.sets.values()) and len(rec.sets) == 51
    assert sample(sub.metrics.registry, "anywan_bus_snapshots_taken_total") == 1
    assert sample(pub.metrics.registry, "anywan_bus_snapshots_served_total") == 1


def test_subscriber_restart_converges(bus: Bus) -> None:
    pub = bus.publisher()
    pub.set(make_tunnel(1))
    sub = bus.subscriber("w1")
    assert wait_until(lambda: converged(pub, sub))
    bus.stop(sub)
    for i in range(20):
        pub.set(make_sa(0x2000 + i))
    pub.delete(make_tunnel(1).key)
    rec = Recorder()
    sub2 = bus.subscriber("w1", recorder=rec)
    assert wait_until(lambda: converged(pub, sub2))
    assert set(rec.sets) == {make_sa(0x2000 + i).key for i in range(20)}
    assert not rec.deletes


def test_publisher_restart_same_records_no_churn(bus: Bus) -> None:
    records = [make_sa(0x3000 + i) for i in range(30)] + [make_tunnel(2)]
    pub = bus.publisher(initial=records)
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec)
    assert wait_until(lambda: converged(pub, sub))
    assert sum(rec.sets.values()) == 31
    epoch = sub.epoch
    bus.stop(pub)
    # Workers keep their state while control is down.
    time.sleep(0.2)
    assert len(sub.state) == 31
    pub2 = bus.publisher(initial=records)
    assert pub2.epoch != epoch
    assert wait_until(lambda: sub.epoch == pub2.epoch and converged(pub2, sub))
    assert sub.snapshots >= 2
    # Same records: no on_delete storm, no re-set.
    assert not rec.deletes
    assert sum(rec.sets.values()) == 31
    # And the new publisher's updates flow.
    seq = pub2.set(make_sa(0x3FFF))
    assert wait_until(lambda: sub.applied_seq >= seq and converged(pub2, sub))


def test_publisher_restart_changed_records_reports_only_difference(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(initial=[make_sa(1000), make_sa(1001), make_tunnel(1)])
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec)
    assert wait_until(lambda: converged(pub, sub))
    bus.stop(pub)
    pub2 = bus.publisher(initial=[make_sa(1000), make_sa(1002), make_tunnel(1, mtu=1400)])
    assert wait_until(lambda: converged(pub2, sub))
    assert rec.deletes == {make_sa(1001).key: 1}
    assert rec.sets[make_sa(1002).key] == 1
    assert rec.sets[make_tunnel(1).key] == 2
    assert rec.sets[make_sa(1000).key] == 1


def test_injected_loss_gap_resync(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=5.0)  # the gap must be seen from the stream
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec, heartbeat_timeout=10.0)
    pub.set(make_tunnel(1))
    assert wait_until(lambda: converged(pub, sub))
    pub.inject_loss(1)
    lost = pub.set(make_sa(0x4000))
    pub.set(make_sa(0x4001))
    assert wait_until(lambda: converged(pub, sub) and sub.applied_seq == lost + 1)
    reg = sub.metrics.registry
    assert sample(reg, "anywan_bus_gaps_total") == 1
    assert sample(reg, "anywan_bus_snapshot_requests_total", reason="gap") == 1
    assert rec.sets[make_sa(0x4000).key] == 1 and rec.sets[make_sa(0x4001).key] == 1


def test_loss_of_last_update_seen_by_heartbeat(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    sub = bus.subscriber("w1")
    assert wait_until(lambda: converged(pub, sub))
    pub.inject_loss(1)
    pub.set(make_route(3))
    assert wait_until(lambda: converged(pub, sub), timeout=2)
    assert sample(sub.metrics.registry, "anywan_bus_gaps_total") == 1


def test_heartbeat_silence_resnapshots(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    pub.set(make_tunnel(1))
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec, heartbeat_timeout=0.3)
    assert wait_until(lambda: converged(pub, sub))
    pub.pause_heartbeats(0.8)
    reg = sub.metrics.registry
    assert wait_until(lambda: sample(reg, "anywan_bus_heartbeats_missed_total") >= 1, timeout=2)
    assert wait_until(lambda: sub.snapshots >= 2 and converged(pub, sub), timeout=3)
    assert sample(reg, "anywan_bus_snapshot_requests_total", reason="heartbeat") >= 1
    assert rec.sets[make_tunnel(1).key] == 1 and not rec.deletes


def test_wrong_curve_key_gets_nothing(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher()
    pub.set(make_sa(0x5000))
    rec = Recorder()
    stranger = bus.subscriber("intruder", client=-1, recorder=rec)
    good = bus.subscriber("w1")
    assert wait_until(lambda: converged(pub, good))
    pub.set(make_sa(0x5001))
    time.sleep(0.5)
    assert not stranger.ready.is_set()
    assert stranger.state == {} and not rec.sets
    assert [s.worker_id for s in pub.subscribers()] == ["w1"]


def _raw_stream_update(pub: object, key: str, value: bytes) -> int:
    """Publish raw bytes under a key, bypassing encode (a buggy or newer control)."""
    with pub._lock:  # type: ignore[attr-defined]
        pub._seq += 1  # type: ignore[attr-defined]
        seq = pub._seq  # type: ignore[attr-defined]
        pub._values[key] = value  # type: ignore[attr-defined]
        pub._outbox.append((pub.epoch, seq, key, value))  # type: ignore[attr-defined]
    pub._wake()  # type: ignore[attr-defined]
    return seq


def test_malformed_and_wrong_version_rejected_and_counted(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher()
    good = make_sa(0x6000)
    pub.set(good)
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec)
    assert wait_until(lambda: converged(pub, sub))
    newer = msgpack.unpackb(encode(make_sa(0x6001)))
    newer["schema"] = SCHEMA + 1
    bad_field = msgpack.unpackb(encode(make_sa(0x6002)))
    bad_field["enc_key"] = b"short"
    s1 = _raw_stream_update(pub, make_sa(0x6001).key, msgpack.packb(newer))
    _raw_stream_update(pub, make_sa(0x6002).key, msgpack.packb(bad_field))
    _raw_stream_update(pub, good.key, b"\xc1garbage")  # update of an existing key
    _raw_stream_update(pub, "sa/in/deadbeef", encode(make_sa(0x6003)))  # key mismatch
    last = pub.set(make_route(1))
    assert wait_until(lambda: sub.applied_seq >= last)
    reg = sub.metrics.registry
    assert sample(reg, "anywan_bus_rejected_records_total", reason="version") == 1
    assert sample(reg, "anywan_bus_rejected_records_total", reason="invalid") == 1
    assert sample(reg, "anywan_bus_rejected_records_total", reason="malformed") == 1
    assert sample(reg, "anywan_bus_rejected_records_total", reason="key_mismatch") == 1
    # Nothing half-applied: the bad keys are absent, the good one kept its value.
    assert set(sub.state) == {good.key, make_route(1).key}
    assert sub.state[good.key] == good
    assert rec.sets == {good.key: 1, make_route(1).key: 1}
    assert sub.applied_seq > s1  # the stream went on past the rejected records
    # A fresh subscriber rejects the same records from the snapshot.
    sub2 = bus.subscriber("w2", client=1)
    assert sub2.ready.wait(3)
    assert set(sub2.state) == {make_route(1).key}  # the good SA's latest value is garbage
    reg2 = sub2.metrics.registry
    assert sample(reg2, "anywan_bus_rejected_records_total", reason="version") == 1
    assert sample(reg2, "anywan_bus_rejected_records_total", reason="malformed") == 1


def test_wait_applied_three_subscribers(bus: Bus) -> None:
    pub = bus.publisher()
    subs = [bus.subscriber(f"w{i}", client=i) for i in range(3)]
    assert all(s.ready.wait(3) for s in subs)
    assert wait_until(lambda: len([s for s in pub.subscribers() if s.live]) == 3)

    async def scenario() -> tuple[bool, bool]:
        seq = pub.set(make_sa(0x7000))
        ok = await pub.wait_applied(seq, timeout=3)
        everywhere = all(s.applied_seq >= seq for s in subs)
        return ok, everywhere and pub.applied_everywhere(seq)

    ok, everywhere = asyncio.run(scenario())
    assert ok and everywhere
    # A sequence nobody has yet: not applied, and the wait times out.
    assert not pub.applied_everywhere(pub.sequence + 1)
    assert not asyncio.run(pub.wait_applied(pub.sequence + 1, timeout=0.2))
    st = {s.worker_id: s for s in pub.subscribers()}
    assert set(st) == {"w0", "w1", "w2"} and all(s.lag == 0 for s in st.values())
    # A stopped worker says goodbye and no longer holds make-before-break up.
    bus.stop(subs[0])
    assert wait_until(lambda: "w0" not in {s.worker_id for s in pub.subscribers()})
    seq = pub.set(make_sa(0x7001))
    assert pub.wait_applied_sync(seq, timeout=3)


def test_wait_applied_blocks_on_a_stuck_subscriber(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    fast = bus.subscriber("fast", client=0)
    stuck_gate = __import__("threading").Event()

    def slow_set(key: str, rec: object) -> None:
        stuck_gate.wait(5)

    slow = bus.subscriber("slow", client=1)
    assert fast.ready.wait(3) and slow.ready.wait(3)
    slow._io.on_set = slow_set  # type: ignore[assignment]
    assert wait_until(lambda: len(pub.subscribers()) == 2)
    seq = pub.set(make_sa(0x7100))
    assert wait_until(lambda: fast.applied_seq >= seq)
    assert not pub.wait_applied_sync(seq, timeout=0.3)
    stuck_gate.set()
    assert pub.wait_applied_sync(seq, timeout=3)


def test_wait_applied_waits_for_the_application_to_confirm(tcp_bus: Bus) -> None:
    """A subscriber made with ``on_batch`` (the worker: records are applied
    later, in its packet loop) is "applied" only once the application hands
    the batch's token back; heartbeats keep it alive meanwhile."""
    import queue

    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    tokens: queue.SimpleQueue[object] = queue.SimpleQueue()
    sub = bus.subscriber("loop", on_batch=tokens.put)
    assert sub.ready.wait(3)
    sub.confirm(tokens.get(timeout=3))  # the snapshot's batch
    assert wait_until(lambda: len(pub.subscribers()) == 1)
    seq = pub.set(make_sa(0x7200))
    assert wait_until(lambda: sub.applied_seq >= seq)  # handed over ...
    token = tokens.get(timeout=3)
    assert token == (sub.epoch, seq)
    assert not pub.wait_applied_sync(seq, timeout=0.4)  # ... but not applied
    (status,) = pub.subscribers()
    assert status.live and status.applied_seq < seq
    t0 = time.monotonic()
    sub.confirm(token)  # type: ignore[arg-type]
    assert pub.wait_applied_sync(seq, timeout=3)
    assert time.monotonic() - t0 < 0.5  # the ack goes at once, not at the next heartbeat


def test_confirm_pipe_closed_with_the_subscriber(tcp_bus: Bus) -> None:
    """The wake pipe of an ``on_batch`` subscriber outlives stop() (it may
    start again) but not the object: no two descriptors left per subscriber."""
    import gc

    tcp_bus.publisher()
    sub = tcp_bus.subscriber("pipe", on_batch=lambda token: None)
    assert sub._wake is not None
    fds = (sub._wake[0], sub._wake_w)
    tcp_bus.stop(sub)
    os.fstat(fds[0])  # still open after stop
    del sub
    gc.collect()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_snapshot_wire_count_checked() -> None:
    """A snapshot whose KTHXBAI count disagrees with what arrived is not installed."""
    c = clone.CloneClient("w", heartbeat_timeout=1)
    c.start(0.0)
    c.receive_stream(clone.heartbeat_frames(7, 0), 0.0)
    req = next(e for e in iter(c.next_event, None) if isinstance(e, clone.RequestSnapshot))
    rid = req.frames[2]
    for chunk in clone.snapshot_chunks(rid, [(make_sa(300).key, encode(make_sa(300)))]):
        c.receive_snapshot(chunk, 0.1)
    c.receive_snapshot(clone.snapshot_end_frames(rid, 7, 0, 2), 0.1)
    assert c.state == {} and c.phase is clone.Phase.SNAPSHOTTING


def test_nothing_applied_twice_under_churn(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    seen: list[list[tuple[str, int]]] = [[], [], []]

    def recorder(i: int) -> Callable[[str, Record], None]:
        return lambda key, rec: seen[i].append((key, rec.generation))  # type: ignore[union-attr]

    subs = [bus.subscriber(f"w{i}", client=i) for i in range(3)]
    for i, s in enumerate(subs):
        s._io.on_set = recorder(i)
    assert all(s.ready.wait(3) for s in subs)
    for i in range(300):
        if i == 150:
            pub.inject_loss(2)  # forces a resnapshot mid-stream
        pub.set(make_sa(0x8000 + i % 40, generation=i))
    assert wait_until(lambda: converged(pub, *subs), timeout=5)
    for s, log in zip(subs, seen, strict=True):
        # Each (key, value) written once is reported at most once, and in order.
        assert len(log) == len(set(log))
        for key in {k for k, _ in log}:
            gens = [g for k, g in log if k == key]
            assert gens == sorted(gens)
            assert gens[-1] == s.state[key].generation  # type: ignore[union-attr]
        assert s.metrics.registry.get_sample_value("anywan_bus_gaps_total") == 1


def test_same_subscriber_object_restarts_and_reconciles(tcp_bus: Bus) -> None:
    bus = tcp_bus
    pub = bus.publisher()
    pub.set(make_tunnel(1))
    pub.set(make_sa(0xB000))
    rec = Recorder()
    sub = bus.subscriber("w1", recorder=rec)
    assert wait_until(lambda: converged(pub, sub))
    sub.stop()
    pub.delete(make_tunnel(1).key)
    pub.set(make_sa(0xB001))
    sub.start()
    assert wait_until(lambda: converged(pub, sub) and sub.snapshots == 2)
    assert rec.deletes == {make_tunnel(1).key: 1}
    assert rec.sets == {make_tunnel(1).key: 1, make_sa(0xB000).key: 1, make_sa(0xB001).key: 1}


def test_killed_subscriber_process_stops_counting(tmp_path: Path) -> None:
    """SIGKILL a subscriber process: control stops waiting for it after the timeout."""
    from bench.replication import Lab

    lab = Lab(tmp_path / "keys")
    pub = Publisher(
        snapshot_endpoint="tcp://127.0.0.1:*",
        update_endpoint="tcp://127.0.0.1:*",
        ack_endpoint="tcp://127.0.0.1:*",
        server_public=lab.server[0],
        server_secret=lab.server[1],
        allowed_clients=[lab.client_public],
        heartbeat_interval=0.1,
        subscriber_timeout=0.5,
    )
    pub.start()
    proc = lab.spawn(pub, "stream", 0, 30)
    try:
        assert wait_until(lambda: [s.live for s in pub.subscribers()] == [True], timeout=10)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        seq = pub.set(make_sa(0xC000))
        assert pub.wait_applied_sync(seq, timeout=3)  # then it times out of the count
        assert [s.live for s in pub.subscribers()] == [False]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pub.stop()


PUBLISHER_CHILD = r"""
import sys, time, zmq
from replication.publisher import Publisher
from tests.replication.conftest import make_sa, make_tunnel
server_pub, server_sec, client_pub, eps = sys.argv[1:5]
snap, upd, ack = eps.split(",")
records = [make_tunnel(1), *(make_sa(0xD000 + i) for i in range(int(sys.argv[5])))]
pub = Publisher(snapshot_endpoint=snap, update_endpoint=upd, ack_endpoint=ack,
                server_public=server_pub.encode(), server_secret=server_sec.encode(),
                allowed_clients=[client_pub.encode()], heartbeat_interval=0.05, initial=records)
pub.start()
print(pub.snapshot_endpoint, pub.update_endpoint, pub.ack_endpoint, pub.epoch, flush=True)
time.sleep(60)
"""


def test_publisher_process_sigkilled_and_restarted(keys: Keys) -> None:
    """Control dies hard and comes back with the same state: workers keep every
    record throughout and see no on_delete/on_set storm."""
    root = Path(__file__).resolve().parents[2]

    def spawn(eps: str, n: int) -> tuple[subprocess.Popen[str], list[str]]:
        p = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER_CHILD, keys.server[0].decode(),
             keys.server[1].decode(), keys.clients[0][0].decode(), eps, str(n)],
            stdout=subprocess.PIPE, text=True, cwd=root,
        )  # fmt: skip
        assert p.stdout is not None
        return p, p.stdout.readline().split()

    procs: list[subprocess.Popen[str]] = []
    sub = None
    try:
        p1, info = spawn(",".join(["tcp://127.0.0.1:*"] * 3), 20)
        procs.append(p1)
        rec = Recorder()
        bus = Bus(keys, (info[0], info[1], info[2]))
        sub = bus.subscriber("w1", recorder=rec, heartbeat_timeout=0.3)
        assert wait_until(lambda: len(sub.state) == 21 and sub.epoch == int(info[3]))
        p1.send_signal(signal.SIGKILL)
        p1.wait(5)
        time.sleep(0.5)  # heartbeats missed, snapshot requests unanswered
        assert len(sub.state) == 21  # nothing vanished while control was dead
        assert sub.metrics.registry.get_sample_value("anywan_bus_heartbeats_missed_total") >= 1
        p2, info2 = spawn(",".join(info[:3]), 20)
        procs.append(p2)
        assert wait_until(lambda: sub.epoch == int(info2[3]) and len(sub.state) == 21)
        assert not rec.deletes and sum(rec.sets.values()) == 21
    finally:
        if sub is not None:
            sub.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_subscriber_restarts_while_a_snapshot_request_is_open(tcp_bus: Bus) -> None:
    """stop() with a snapshot connection open, then start(): the new run must
    not poll the old (destroyed) connection, or its thread ends at once."""
    bus = tcp_bus
    pub = bus.publisher(heartbeat_interval=0.05)
    pub.set(make_tunnel(1))
    sub = bus.subscriber("w1", heartbeat_timeout=0.2)
    assert wait_until(lambda: converged(pub, sub))
    bus.stop(pub)  # silence: the subscriber re-requests and keeps waiting
    assert wait_until(lambda: sub._io.dealer is not None, timeout=3)
    sub.stop()
    sub.start()
    pub = bus.publisher(heartbeat_interval=0.05)
    pub.set(make_sa(0xB100))
    assert wait_until(lambda: converged(pub, sub), timeout=5)
