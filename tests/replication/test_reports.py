"""Worker reports riding on acks: sent, kept per live subscriber, bounded."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest
import zmq

from replication import clone
from replication.curve import configure_client
from tests.replication.conftest import Bus, Keys, wait_until
from tests.replication.test_forwarder import local_worker, make_forwarder


def sample(registry: object, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)  # type: ignore[attr-defined]
    return float(value or 0.0)


def test_core_sends_report_with_next_ack_only() -> None:
    core = clone.CloneClient("w1", heartbeat_timeout=1.0, ack_interval=0.0)
    core.start(0.0)
    core.receive_stream(clone.heartbeat_frames(7, 0), 0.0)
    req = next(e for e in iter(core.next_event, None) if isinstance(e, clone.RequestSnapshot))
    core.receive_snapshot(clone.snapshot_end_frames(req.frames[2], 7, 0, 0), 0.0)
    core.set_report({"in": {1: [2, 3]}})
    core.handle_timer(0.0)
    acks = [e for e in iter(core.next_event, None) if isinstance(e, clone.SendAck)]
    assert len(acks) == 1 and len(acks[0].frames) == 4
    assert clone.parse_ack(acks[0].frames) == ("w1", 7, 0)
    assert clone.parse_report(acks[0].frames) == ({"in": {1: [2, 3]}}, None)
    # The next ack (after a heartbeat) carries no stale report.
    core.receive_stream(clone.heartbeat_frames(7, 0), 0.1)
    core.handle_timer(0.1)
    acks = [e for e in iter(core.next_event, None) if isinstance(e, clone.SendAck)]
    assert len(acks) == 1 and len(acks[0].frames) == 3


def test_oversized_report_refused_at_the_source() -> None:
    core = clone.CloneClient("w1")
    with pytest.raises(ValueError, match="exceeds"):
        core.set_report({"blob": b"x" * clone.MAX_REPORT_BYTES})
    with pytest.raises(ValueError):
        core.set_report([1, 2])  # type: ignore[arg-type]


def test_parse_report_rejects_bad_frames() -> None:
    hdr = clone.HDR.pack(1, 1)
    assert clone.parse_report([clone.ACK, b"w", hdr]) == (None, None)
    big = b"\x00" * (clone.MAX_REPORT_BYTES + 1)
    assert clone.parse_report([clone.ACK, b"w", hdr, big]) == (None, "oversized")
    assert clone.parse_report([clone.ACK, b"w", hdr, b"\xc1"]) == (None, "malformed")
    assert clone.parse_report([clone.ACK, b"w", hdr, msgpack.packb([1])]) == (None, "malformed")
    deep = b"\x91" * 60000 + b"\x00"  # 60000 nested arrays: no recursion blow-up
    assert clone.parse_report([clone.ACK, b"w", hdr, deep])[1] == "malformed"


def test_two_subscribers_report_publisher_keeps_latest(tcp_bus: Bus, keys: Keys) -> None:
    pub = tcp_bus.publisher()
    a = tcp_bus.subscriber("w-a", client=0)
    b = tcp_bus.subscriber("w-b", client=1)
    assert a.ready.wait(3) and b.ready.wait(3)
    a.set_report({"out": {0x10: [5, 500]}})
    b.set_report({"out": {0x10: [7, 700]}})
    assert wait_until(lambda: len(pub.reports()) == 2)
    got = pub.reports()
    assert sum(r["out"][0x10][0] for r in got.values()) == 12
    assert sum(r["out"][0x10][1] for r in got.values()) == 1200
    a.set_report({"out": {0x10: [6, 600]}})  # the newest replaces the old
    assert wait_until(lambda: pub.reports().get("w-a", {}).get("out", {}).get(0x10) == [6, 600])
    # A subscriber that stops is no longer counted.
    tcp_bus.stop(b)
    assert wait_until(lambda: set(pub.reports()) == {"w-a"})


def test_bad_reports_dropped_counted_ack_still_counts(tcp_bus: Bus, keys: Keys) -> None:
    pub = tcp_bus.publisher()
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        configure_client(push, keys.server[0], *keys.clients[2])
        push.connect(pub.ack_endpoint)
        hdr = clone.HDR.pack(pub.epoch, pub.sequence)
        push.send_multipart([clone.ACK, b"rogue", hdr, b"\x00" * (clone.MAX_REPORT_BYTES + 10)])
        push.send_multipart([clone.ACK, b"rogue", hdr, b"\xc1\xc1"])
        push.send_multipart([clone.ACK, b"rogue", hdr, msgpack.packb("not a map")])
        reg = pub.metrics.registry
        assert wait_until(
            lambda: (
                sample(reg, "anywan_bus_reports_total", result="malformed") == 2
                and sample(reg, "anywan_bus_reports_total", result="oversized") == 1
            )
        )
        assert "rogue" in {s.worker_id for s in pub.subscribers()}
        assert pub.reports() == {}
        push.send_multipart([clone.ACK, b"rogue", hdr, msgpack.packb({"ok": 1})])
        assert wait_until(lambda: pub.reports() == {"rogue": {"ok": 1}})
        assert sample(reg, "anywan_bus_reports_total", result="ok") == 1
    finally:
        ctx.destroy(linger=0)


def test_reports_pass_through_a_forwarder(tcp_bus: Bus, keys: Keys, tmp_path: Path) -> None:
    pub = tcp_bus.publisher()
    fwd = make_forwarder(keys, tmp_path, tcp_bus.endpoints, "node-a")
    from tests.replication.conftest import Recorder

    w = local_worker(fwd, keys, 0, Recorder())
    try:
        assert w.ready.wait(3)
        w.set_report({"in": {0xABC: [1, 64]}})
        assert wait_until(lambda: "node-a/w0" in pub.reports())
        assert pub.reports()["node-a/w0"] == {"in": {0xABC: [1, 64]}}
        assert "node-a" not in pub.reports()  # the forwarder itself reports nothing
    finally:
        w.stop()
        fwd.stop()
