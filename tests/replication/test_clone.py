"""The sans-IO Clone subscriber core: frames and a hand-stepped clock in, events out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from replication import clone
from replication.clone import CloneClient, Phase
from replication.records import encode
from tests.replication.conftest import make_sa, make_tunnel

EPOCH = 0xE1
HB = 1.0


def events(c: CloneClient) -> list[clone.Event]:
    return list(iter(c.next_event, None))


def upd(seq: int, rec: object | None = None, *, key: str = "", epoch: int = EPOCH) -> list[bytes]:
    if rec is None:
        return clone.update_frames(epoch, seq, key, b"")
    return clone.update_frames(epoch, seq, rec.key, encode(rec))  # type: ignore[attr-defined]


def snapshot(
    c: CloneClient,
    req: clone.RequestSnapshot,
    recs: list[object],
    seq: int,
    now: float,
    epoch: int = EPOCH,
) -> None:
    rid = req.frames[2]
    items = [(r.key, encode(r)) for r in recs]  # type: ignore[attr-defined]
    for chunk in clone.snapshot_chunks(rid, items, chunk=2):
        c.receive_snapshot(chunk, now)
    c.receive_snapshot(clone.snapshot_end_frames(rid, epoch, seq, len(items)), now)


def live_client(recs: list[object], seq: int = 10) -> CloneClient:
    c = CloneClient("w1", heartbeat_timeout=HB)
    c.start(0.0)
    c.receive_stream(clone.heartbeat_frames(EPOCH, seq), 0.0)
    req = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    snapshot(c, req, recs, seq, 0.0)
    c.handle_timer(0.0)  # the post-snapshot ack
    events(c)
    assert c.phase is Phase.LIVE
    return c


def test_waits_for_stream_then_snapshots_and_applies_buffer() -> None:
    c = CloneClient("w1", heartbeat_timeout=HB)
    c.start(0.0)
    assert c.phase is Phase.CONNECTING and c.get_timer() == HB
    assert events(c) == []
    # The first stream message proves the subscription: ask for the snapshot.
    c.receive_stream(upd(5, make_sa(300)), 0.1)
    (started, req) = events(c)
    assert started == clone.ResnapshotStarted("start")
    assert isinstance(req, clone.RequestSnapshot) and req.frames[:2] == [clone.ICANHAZ, b"w1"]
    # Updates during the snapshot are buffered, not applied.
    c.receive_stream(upd(6, make_sa(301)), 0.2)
    c.receive_stream(upd(7, key=make_sa(300).key), 0.2)
    assert c.state == {} and events(c) == []
    snapshot(c, req, [make_sa(300), make_tunnel(1)], 6, 0.3)
    evs = events(c)
    kinds = [type(e).__name__ for e in evs]
    # Snapshot (seq 6, so updates 5 and 6 are in it), then update 7 (delete).
    assert kinds == [
        "RecordChanged",
        "RecordChanged",
        "SnapshotInstalled",
        "RecordRemoved",
    ]
    assert set(c.state) == {make_tunnel(1).key}
    assert c.applied_seq == 7
    # The ack is due at once (none sent yet) and reports the applied sequence.
    assert c.get_timer() == 0.3
    c.handle_timer(0.3)
    (ack,) = events(c)
    assert isinstance(ack, clone.SendAck)
    assert ack.frames == [clone.ACK, b"w1", clone.HDR.pack(EPOCH, 7)]


def test_acks_are_coalesced_by_interval() -> None:
    c = live_client([])
    c.receive_stream(upd(11, make_tunnel(1)), 0.002)
    c.receive_stream(upd(12, make_tunnel(2)), 0.004)
    assert c.get_timer() == c.ack_interval  # one interval after the last ack
    c.handle_timer(0.005)
    assert [type(e) for e in events(c)] == [clone.RecordChanged, clone.RecordChanged]
    c.handle_timer(c.ack_interval)
    (ack,) = events(c)
    assert isinstance(ack, clone.SendAck) and ack.frames[2] == clone.HDR.pack(EPOCH, 12)
    assert c.get_timer() == 0.004 + HB  # only the heartbeat deadline is left


def test_connecting_gives_up_waiting_after_timeout() -> None:
    c = CloneClient("w1", heartbeat_timeout=HB)
    c.start(0.0)
    c.handle_timer(0.5)
    assert events(c) == []
    c.handle_timer(HB)
    assert [type(e) for e in events(c)] == [clone.ResnapshotStarted, clone.RequestSnapshot]


def test_gap_keeps_old_state_until_new_snapshot() -> None:
    c = live_client([make_sa(300), make_sa(301)])
    c.receive_stream(upd(11, make_tunnel(1)), 1.0)
    c.receive_stream(upd(13, make_tunnel(2)), 1.1)  # 12 lost
    evs = events(c)
    assert clone.GapDetected(12, 13) in evs
    req = next(e for e in evs if isinstance(e, clone.RequestSnapshot))
    assert req.reason == "gap" and c.phase is Phase.SNAPSHOTTING
    # Old state still serves while the snapshot is in flight.
    assert set(c.state) == {make_sa(300).key, make_sa(301).key, make_tunnel(1).key}
    c.receive_stream(upd(14, key=make_sa(300).key), 1.2)
    snapshot(c, req, [make_sa(300), make_sa(301), make_tunnel(1), make_tunnel(2)], 13, 1.3)
    evs = events(c)
    changed = [e.key for e in evs if isinstance(e, clone.RecordChanged)]
    removed = [e.key for e in evs if isinstance(e, clone.RecordRemoved)]
    assert changed == [make_tunnel(2).key]  # only what really changed
    assert removed == [make_sa(300).key]  # by the buffered update 14
    assert c.applied_seq == 14


def test_stale_snapshot_reply_ignored() -> None:
    c = live_client([])
    c.receive_stream(upd(12, make_tunnel(1)), 1.0)  # gap → request 2
    old = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    c.handle_timer(1.0 + HB)  # no reply: request 3 on a fresh connection
    new = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    assert new.reason == "snapshot_timeout" and new.frames[2] != old.frames[2]
    snapshot(c, old, [make_sa(999)], 12, 2.1)
    assert c.state == {} and c.phase is Phase.SNAPSHOTTING
    snapshot(c, new, [make_tunnel(1)], 12, 2.2)
    assert set(c.state) == {make_tunnel(1).key} and c.phase is Phase.LIVE


def test_heartbeat_deadline_and_gap_from_heartbeat() -> None:
    c = live_client([make_tunnel(1)])
    assert c.get_timer() == HB
    c.receive_stream(clone.heartbeat_frames(EPOCH, 10), 0.5)
    c.handle_timer(0.5)
    assert [type(e) for e in events(c)] == [clone.SendAck]  # liveness ack
    assert c.get_timer() == 0.5 + HB
    c.handle_timer(0.5 + HB)
    evs = events(c)
    assert isinstance(evs[0], clone.HeartbeatMissed) and evs[0].silent_for == HB
    assert clone.ResnapshotStarted("heartbeat") in evs
    # A heartbeat announcing a sequence we never got is a gap.
    c2 = live_client([])
    c2.receive_stream(clone.heartbeat_frames(EPOCH, 11), 0.2)
    assert clone.ResnapshotStarted("gap") in events(c2)


def test_epoch_change_resnapshots_without_churn() -> None:
    recs = [make_sa(300), make_tunnel(1)]
    c = live_client(recs, seq=50)
    c.receive_stream(clone.heartbeat_frames(0xE2, 0), 1.0)
    req = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    assert req.reason == "epoch"
    snapshot(c, req, recs, 0, 1.1, epoch=0xE2)
    evs = events(c)
    assert not [e for e in evs if isinstance(e, clone.RecordChanged | clone.RecordRemoved)]
    assert c.epoch == 0xE2 and c.applied_seq == 0 and len(c.state) == 2


def test_duplicates_and_same_bytes_are_not_reapplied() -> None:
    c = live_client([make_tunnel(1)])
    c.receive_stream(upd(11, make_sa(300)), 1.0)
    c.receive_stream(upd(11, make_sa(300)), 1.0)  # duplicate seq
    c.receive_stream(upd(12, make_sa(300)), 1.0)  # same value again
    changed = [e for e in events(c) if isinstance(e, clone.RecordChanged)]
    assert len(changed) == 1 and c.applied_seq == 12


def test_rejected_update_keeps_previous_value() -> None:
    c = live_client([make_sa(300)])
    c.receive_stream(clone.update_frames(EPOCH, 11, make_sa(300).key, b"\x81\xa1x\x01"), 1.0)
    c.receive_stream(clone.update_frames(EPOCH, 12, "sa/in/00000999", encode(make_sa(300))), 1.0)
    evs = events(c)
    assert [e.reason for e in evs if isinstance(e, clone.Rejected)] == ["version", "key_mismatch"]
    assert c.state == {make_sa(300).key: make_sa(300)} and c.applied_seq == 12


def test_keep_raw_reports_sequenced_updates_and_snapshot_copy() -> None:
    c = CloneClient("fwd", heartbeat_timeout=HB, keep_raw=True)
    c.start(0.0)
    c.receive_stream(clone.heartbeat_frames(EPOCH, 3), 0.0)
    req = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    c.receive_stream(upd(4, make_sa(300)), 0.0)
    snapshot(c, req, [make_tunnel(1)], 3, 0.1)
    evs = events(c)
    inst = next(e for e in evs if isinstance(e, clone.SnapshotInstalled))
    assert inst.raw == {make_tunnel(1).key: encode(make_tunnel(1))}  # as of seq 3
    seqd = [e for e in evs if isinstance(e, clone.Sequenced)]
    assert [(e.seq, e.key) for e in seqd] == [(4, make_sa(300).key)]


frame = st.binary(max_size=40)
msg = st.one_of(
    st.lists(frame, max_size=5),
    st.tuples(st.sampled_from([clone.UPD, clone.HUGZ, clone.KVS, clone.KTHXBAI]), frame).map(list),
    st.tuples(
        st.just(clone.UPD),
        st.builds(
            lambda e, s: clone.HDR.pack(e, s), st.sampled_from([EPOCH, 1]), st.integers(0, 20)
        ),
        frame,
        frame,
    ).map(list),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), msg), max_size=30))
def test_garbage_frames_never_crash(msgs: list[tuple[bool, list[bytes]]]) -> None:
    c = live_client([make_tunnel(1)])
    now = 1.0
    for to_snapshot, frames in msgs:
        now += 0.01
        if to_snapshot:
            c.receive_snapshot(frames, now)
        else:
            c.receive_stream(frames, now)
        c.handle_timer(now)
        events(c)
    assert all(k.startswith(("tunnel/", "sa/", "route/")) for k in c.state)


def test_gated_acks_report_only_what_the_application_confirmed() -> None:
    """A worker's packet loop applies records after its bus thread handed them
    over: with ``gate_acks`` an ack carries the confirmed sequence, so the
    publisher's "applied everywhere" waits for the loop. An update alone asks
    for no ack (one at receipt would push the confirmed one an interval
    later); a heartbeat still gets one, behind; a new epoch starts over."""
    c = CloneClient("w1", heartbeat_timeout=HB, gate_acks=True)
    c.start(0.0)
    c.receive_stream(clone.heartbeat_frames(EPOCH, 10), 0.0)
    req = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    snapshot(c, req, [make_tunnel(1)], 10, 0.0)
    events(c)
    assert c.phase is Phase.LIVE

    def acks(now: float) -> list[int]:
        c.handle_timer(now)
        return [clone.HDR.unpack(e.frames[2])[1] for e in events(c) if isinstance(e, clone.SendAck)]

    assert acks(0.0) == [0]  # the buffered heartbeat's: the loop has nothing yet
    c.confirm(EPOCH, 10, 0.01)
    assert acks(c.ack_interval) == [10]

    c.receive_stream(upd(11, make_tunnel(2)), 0.5)
    assert acks(0.5) == [] and c.get_timer() == 0.5 + HB
    c.receive_stream(clone.heartbeat_frames(EPOCH, 11), 0.6)
    assert acks(0.6) == [10]  # alive, and visibly behind
    c.confirm(EPOCH, 11, 0.61)
    assert c.get_timer() == 0.6 + c.ack_interval  # coalesced with the previous ack
    assert acks(0.6 + c.ack_interval) == [11]
    c.confirm(EPOCH, 9, 0.7)  # late, older: no effect
    c.confirm(0xE2, 99, 0.7)  # another epoch's: ignored
    assert c.confirmed_seq == 11 and acks(0.7) == []

    # The publisher restarted: its sequences start over, and so do ours.
    c.receive_stream(clone.heartbeat_frames(0xE2, 3), 1.0)
    req = next(e for e in events(c) if isinstance(e, clone.RequestSnapshot))
    snapshot(c, req, [make_tunnel(1)], 3, 1.0, epoch=0xE2)
    events(c)
    c.receive_stream(clone.heartbeat_frames(0xE2, 3), 1.1)
    assert acks(1.1) == [0]
    c.confirm(0xE2, 3, 1.2)
    assert acks(1.2 + c.ack_interval) == [3]


def test_ungated_acks_report_what_was_handed_over() -> None:
    c = live_client([])
    c.receive_stream(upd(11, make_tunnel(1)), 1.0)
    c.handle_timer(1.0)
    (ack,) = [e for e in events(c) if isinstance(e, clone.SendAck)]
    assert ack.frames[2] == clone.HDR.pack(EPOCH, 11) and c.ack_seq == 11
