"""Cluster-wide owner election of replay-protected SAs, the cross-node
handoff (real UDP sockets on loopback) and inbound replay-window
checkpoints (DESIGN §5), on in-process workers."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scapy.layers.inet import ICMP, IP
from scapy.layers.ipsec import ESP, SecurityAssociation

from control.service import live_worker_records, max_replay_tops
from dataplane import worker as worker_mod
from dataplane.drops import DropReason
from dataplane.worker import (
    AccountNet,
    Worker,
    WorkerConfig,
    cluster_id,
    election_view,
    rendezvous_owner,
)
from replication.records import (
    Direction,
    ReplayCheckpoint,
    WorkerRecord,
    decode,
    encode,
)

from ._worker_records import ACCOUNT_A, route, sa, tunnel

T = replace(tunnel(1), replay_protection=True)
OUT = sa(0x2001, Direction.OUT, udp_encap=True, remote_port=4501)
IN_KEY, IN_SALT = os.urandom(32), os.urandom(4)
IN = sa(0x1001, Direction.IN, enc_key=IN_KEY, salt=IN_SALT, replay_window=64)
PKT = bytes(IP(src="10.1.0.2", dst="10.2.0.9") / ICMP())
NODES = [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]


def recs(members: list[tuple[str, int]]) -> list[WorkerRecord]:
    return [
        WorkerRecord(n, i, "127.0.0.1", 40000 + k, os.urandom(32))
        for k, (n, i) in enumerate(members)
    ]


# ---- election_view / rendezvous: pure -------------------------------------------------


def test_every_worker_elects_the_same_single_owner() -> None:
    rs = recs(NODES)
    views = {(n, i): election_view(rs, n, i, [0, 1]) for n, i in NODES}
    assert len({v[0] for v in views.values()}) == 1  # one view cluster-wide
    for spi in range(0x1000, 0x1000 + 400):
        owners = [w for w, (live, me) in views.items() if rendezvous_owner(spi, live) == me]
        assert len(owners) == 1, (hex(spi), owners)
    # SAs spread over all four workers, not just one node
    ids = views[("n1", 0)][0]
    assert {rendezvous_owner(s, ids) for s in range(0x1000, 0x1400)} == set(ids)


def test_a_dead_worker_seen_only_on_its_node_keeps_one_owner() -> None:
    """n1/1 died: n1 knows at once (its lock file), n2 only when control
    tombstones its record. The node comes first in the weight, so n2 still
    hands n1's SAs to node n1, whose own view picks the live sibling: every
    SA keeps exactly one live owner, and n1/1's SAs moved within n1."""
    rs = recs(NODES)
    views = {
        ("n1", 0): election_view(rs, "n1", 0, [0]),
        ("n2", 0): election_view(rs, "n2", 0, [0, 1]),
        ("n2", 1): election_view(rs, "n2", 1, [0, 1]),
    }
    dead = cluster_id("n1", 1)
    assert dead not in views[("n1", 0)][0] and dead in views[("n2", 0)][0]
    moved = 0
    for spi in range(0x1000, 0x1000 + 400):
        owners = [w for w, (live, me) in views.items() if rendezvous_owner(spi, live) == me]
        assert len(owners) == 1, (hex(spi), owners)
        if rendezvous_owner(spi, views[("n2", 0)][0]) == dead:
            assert owners == [("n1", 0)]  # the dead one's SAs: to its sibling
            moved += 1
    assert moved > 50


def test_a_node_without_records_is_not_a_candidate() -> None:
    live, me = election_view(recs(NODES[:2]), "n2", 0, [0])
    assert me not in live and len(live) == 2
    assert cluster_id("n1", 0) != cluster_id("n2", 0) and min(live) > 255
    # a new worker of a recorded node takes part at once (its node knows it)
    live, me = election_view(recs(NODES[:3]), "n2", 1, [0, 1])
    assert me in live and len(live) == 4


def test_node_ids_and_two_level_weights() -> None:
    assert cluster_id("n1", 0) >> 8 == cluster_id("n1", 7) >> 8 != cluster_id("n2", 0) >> 8
    # node-local ids share node 0: the election among them is by worker
    owners = {rendezvous_owner(spi, (0, 1, 2)) for spi in range(0x1000, 0x1100)}
    assert owners == {0, 1, 2}


# ---- a worker's election state from records -------------------------------------------


class Node:
    """One in-process worker (not started): a real UDP handoff socket on
    loopback, the replay-protected tunnel applied, ESP it sends kept."""

    def __init__(self, tmp: Path, node: str, index: int = 0) -> None:
        run = tmp / node
        run.mkdir(parents=True, exist_ok=True)
        cfg = WorkerConfig(
            anycast="192.0.2.1",
            node=node,
            index=index,
            workers=2,
            run_dir=run,
            metrics_port=0,
            handoff_addr="127.0.0.1",
            handoff_port=0,  # two "nodes" in one namespace: one port each
        )
        self.w = Worker(cfg)
        self.w._open_handoff_udp()
        self.w._live = [index]
        self.sent: list[bytes] = []
        send = lambda d, a, anc: self.sent.append(bytes(d))  # noqa: E731
        self.w.dp.send_esp = self.w.dp.send_udp = send
        self.w.dp.handoff = self.w._handoff_send
        for rec in (T, route(1, "10.2.0.0/24", 1), OUT, IN):
            self.w.dp.apply(rec.key, rec)
        self.net = AccountNet(ACCOUNT_A, lambda d: None)
        self.w.dp.attach_account(self.net)

    def record(self) -> WorkerRecord:
        """What control publishes from this worker's report."""
        got = live_worker_records({self.w.cfg.worker_id: self.w.build_report()})
        (rec,) = got.values()
        return decode(encode(rec))  # type: ignore[return-value]

    def learn(self, *records: WorkerRecord) -> None:
        for r in records:
            self.w._apply_worker(r.key, r)
        self.w.update_election()
        self.w.manage_owned_sas()

    def close(self) -> None:
        self.w.handoff_udp.close()  # type: ignore[union-attr]


def test_election_state_from_records_with_grace_and_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = Node(tmp_path, "n1"), Node(tmp_path, "n2")
    try:
        assert a.w.election == "node" and a.w.dp.live == (0,)
        a.learn(a.record(), b.record())
        assert a.w.election == "cluster"
        assert a.w.dp.live == tuple(sorted([cluster_id("n1", 0), cluster_id("n2", 0)]))
        assert a.w.dp.me == cluster_id("n1", 0)
        assert isinstance(a.w._dest[cluster_id("n1", 0)], str)  # same node: AF_UNIX
        assert a.w._dest[cluster_id("n2", 0)][0] == b.w.handoff_bound  # other node: UDP
        # All records vanish at once (control restart): the view holds ...
        for key in list(a.w._worker_recs):
            a.w._apply_worker(key, None)
        a.w.update_election()
        assert a.w.election == "cluster"
        # ... for RECORD_GRACE seconds, then the node-local election takes over.
        monkeypatch.setattr(worker_mod, "RECORD_GRACE", 0.0)
        a.w.update_election()
        assert a.w.election == "node" and a.w.dp.live == (0,) and a.w.dp.me == 0
    finally:
        a.close()
        b.close()


def test_not_yet_recorded_worker_hands_off_to_a_single_member(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "n1"), Node(tmp_path, "n2")
    try:
        b.learn(a.record())  # b's own record is not out yet
        assert cluster_id("n2", 0) not in b.w.dp.live
        b.w.dp.outbound(b.net, memoryview(PKT))
        assert b.sent == [] and b.w.dp.handed_off == 1 and b.w.remote_sent == 1
    finally:
        a.close()
        b.close()


def _drain(node: Node, want: int, timeout: float = 2.0) -> None:
    end = time.monotonic() + timeout
    while node.w.remote_received + node.w.remote_rejected < want and time.monotonic() < end:
        node.w._drain_handoff_udp()
        time.sleep(0.005)


def test_cross_node_handoff_over_udp_one_sequence_space(tmp_path: Path) -> None:
    """Both nodes get the tunnel's inner traffic; the non-owner hands it to
    the owner on the other node over UDP; the peer sees one sequence space.
    A datagram not sealed under the owner's key is refused and counted."""
    a, b = Node(tmp_path, "n1"), Node(tmp_path, "n2")
    try:
        ra, rb = a.record(), b.record()
        a.learn(ra, rb)
        b.learn(ra, rb)
        owner = a if rendezvous_owner(OUT.spi, a.w.dp.live) == a.w.dp.me else b
        other = b if owner is a else a
        for _ in range(5):
            owner.w.dp.outbound(owner.net, memoryview(PKT))
            other.w.dp.outbound(other.net, memoryview(PKT))
        assert other.sent == [] and other.w.remote_sent == 5
        _drain(owner, 5)
        assert owner.w.remote_received == 5
        seqs = [ESP(p).seq for p in owner.sent]
        assert sorted(seqs) == list(range(1, 11))
        # A packet handed to a worker that is not the owner in its own view
        # (views differ for a moment) is dropped, never sent outside a
        # reservation of its own.
        no_sa = other.w.dp.drops[DropReason.NO_SA]
        other.w.dp.outbound(other.net, memoryview(PKT), False)
        assert other.sent == [] and other.w.dp.drops[DropReason.NO_SA] == no_sa + 1
        # replay protection off: the non-owner sends again, above what it had
        off = replace(T, replay_protection=False)
        other.w.dp.apply(off.key, off)
        other.w.manage_owned_sas()
        other.w.dp.outbound(other.net, memoryview(PKT))
        assert len(other.sent) == 1
        # forged: right shape, wrong key
        bad = os.urandom(32)
        nonce = os.urandom(12)
        body = bytes([len(ACCOUNT_A)]) + ACCOUNT_A.encode() + PKT
        forged = b"\x01" + nonce + AESGCM(bad).encrypt(nonce, body, b"\x01")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(forged, owner.w.handoff_bound)
            s.sendto(b"\x01short", owner.w.handoff_bound)
        _drain(owner, 7)
        assert owner.w.remote_rejected == 2 and len(owner.sent) == 10
    finally:
        a.close()
        b.close()


def _sealed(node: Node, prefix: bytes, ctr: int) -> bytes:
    """A handoff datagram exactly as another node's worker seals it."""
    nonce = prefix + ctr.to_bytes(4, "big")
    body = bytes([len(ACCOUNT_A)]) + ACCOUNT_A.encode() + PKT
    return b"\x01" + nonce + AESGCM(node.w._handoff_key).encrypt(nonce, body, b"\x01")


def test_a_replayed_handoff_datagram_is_sent_once(tmp_path: Path) -> None:
    """An insider on the cluster network who resends a captured handoff
    datagram (from any source port, so possibly to another worker of the
    node) must not make the owner send the inner packet again under a fresh
    ESP sequence number: a window per sender (its nonce prefix) at the owner
    lets each datagram through once, and reordering inside the window."""
    owner = Node(tmp_path, "n1")
    try:
        owner.learn(owner.record())
        prefix = os.urandom(8)
        replayed = 'anywan_worker_replay_remote_handoff_packets_total{result="replayed"}'

        def deliver(*datagrams: bytes) -> None:
            want = owner.w.remote_received + len(datagrams)
            for d in datagrams:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a new port each
                    s.sendto(d, owner.w.handoff_bound)
            _drain(owner, want)

        deliver(_sealed(owner, prefix, 5), _sealed(owner, prefix, 5))
        assert len(owner.sent) == 1 and owner.w.remote_replayed == 1
        assert owner.w.dp.drops[DropReason.REPLAY] == 1
        deliver(_sealed(owner, prefix, 3), _sealed(owner, prefix, 9))  # late, and new
        assert len(owner.sent) == 3
        deliver(_sealed(owner, os.urandom(8), 5))  # another sender's counter 5
        assert len(owner.sent) == 4
        deliver(
            _sealed(owner, prefix, 9 + worker_mod.HANDOFF_WINDOW + 5), _sealed(owner, prefix, 9)
        )
        assert len(owner.sent) == 5 and owner.w.remote_replayed == 2  # 9 is too old now

        # A copy that reached a sibling worker is passed on with its nonce,
        # and the owner's window refuses it just the same.
        name = f"\0awt-handoff-test-{os.getpid()}"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx,
        ):
            rx.bind(name)
            rx.setblocking(False)
            owner.w.handoff_sock = rx
            sibling = Node(tmp_path, "n1", 1)
            try:
                sibling.w.handoff_sock = tx
                sibling.w._dest[7] = name
                top = 9 + worker_mod.HANDOFF_WINDOW + 5
                for ctr in (top - 2, top - 2, top + 1):
                    sibling.w._from_remote = (
                        worker_mod._REMOTE_MARK + prefix + ctr.to_bytes(4, "big")
                    )
                    sibling.w._handoff_send(ACCOUNT_A, 7, memoryview(PKT))
                sibling.w._from_remote = b""
                sibling.w._handoff_send(ACCOUNT_A, 7, memoryview(PKT))  # its own: no window
                sibling.w._handoff_send(ACCOUNT_A, 7, memoryview(PKT))
                time.sleep(0.05)
                owner.w._drain_handoff()
            finally:
                sibling.close()
        assert len(owner.sent) == 5 + 4 and owner.w.remote_replayed == 3
        owner.w._om.flush(owner.w)
        metric = replayed.split("{")[0]
        assert owner.w.metrics.registry.get_sample_value(metric, {"result": "replayed"}) == 3
    finally:
        owner.close()


def test_owner_moving_to_another_node_continues_above(tmp_path: Path) -> None:
    """Ownership moves n1 → n2 (n1's worker left the records): n2's new
    owner starts above n1's replicated reservation, never below."""
    a, b = Node(tmp_path, "n1"), Node(tmp_path, "n2")
    try:
        ra, rb = a.record(), b.record()
        # make a the owner first: only its record
        a.learn(ra)
        for _ in range(4):
            a.w.dp.outbound(a.net, memoryview(PKT))
        sent_a = [ESP(p).seq for p in a.sent]
        from control.service import max_seq_checkpoints
        from replication.records import SeqCheckpoint

        for (tid, spi), nxt in max_seq_checkpoints([a.w.build_report()]).items():
            ck = SeqCheckpoint(ACCOUNT_A, tid, spi, nxt)
            b.w._apply_checkpoint(ck.key, ck)
        b.learn(rb)  # a is gone from b's records: b is the owner
        for _ in range(3):
            b.w.dp.outbound(b.net, memoryview(PKT))
        sent_b = [ESP(p).seq for p in b.sent]
        assert min(sent_b) > max(sent_a) + worker_mod.SEQ_RESERVATION
    finally:
        a.close()
        b.close()


# ---- inbound replay-window checkpoints ------------------------------------------------


def _esp_in(seq: int) -> memoryview:
    sa_ = SecurityAssociation(
        ESP, spi=IN.spi, crypt_algo="AES-GCM", crypt_key=IN_KEY + IN_SALT,
        crypt_icv_size=16, seq_num=seq,
        tunnel_header=IP(src="198.51.100.2", dst="192.0.2.1"),
    )  # fmt: skip
    inner = IP(src="10.2.0.9", dst="10.1.0.2") / ICMP()
    return memoryview(bytes(sa_.encrypt(inner)[ESP]))


def test_window_raised_from_another_workers_checkpoint(tmp_path: Path) -> None:
    a, b = Node(tmp_path, "n1"), Node(tmp_path, "n2")
    try:
        captured = {s: _esp_in(s) for s in range(1, 41)}
        for s in range(1, 41):
            a.w.dp.inbound_esp(captured[s])
        assert a.w.dp.drops[DropReason.REPLAY] == 0
        report = a.w.build_report()
        assert report["rwin"] == {IN.spi: 40}
        # control: highest top → rwin/ record → b (traffic moves to b)
        for spi, top in max_replay_tops([report]).items():
            rec = decode(encode(ReplayCheckpoint(ACCOUNT_A, T.tunnel_id, spi, top)))
            b.w._apply_rwin(rec.key, rec)
        assert b.w.raise_replay_windows() == 1
        b.w.dp.inbound_esp(captured[40])  # replay of the newest
        b.w.dp.inbound_esp(captured[3])  # and of an old one
        assert b.w.dp.drops[DropReason.REPLAY] == 2
        b.w.dp.inbound_esp(_esp_in(41))  # the next real packet is fine
        assert b.w.dp.drops[DropReason.REPLAY] == 2
        # its own higher top is never lowered by an older checkpoint
        b.w._apply_rwin("rwin/x", ReplayCheckpoint(ACCOUNT_A, T.tunnel_id, IN.spi, 5))
        b.w._apply_rwin("rwin/x", None)  # a restarted control's tombstone: ignored
        assert b.w.raise_replay_windows() == 0
        # without the checkpoint, a fresh worker would accept the replay
        c = Node(tmp_path, "n3")
        try:
            c.w.dp.inbound_esp(captured[40])
            assert c.w.dp.drops[DropReason.REPLAY] == 0
        finally:
            c.close()
        # the checkpoint goes with its SA
        b.w.dp.remove(IN.key)
        b.w.raise_replay_windows()
        assert b.w._rwin == {}
    finally:
        a.close()
        b.close()


def test_report_budget_and_shape(tmp_path: Path) -> None:
    a = Node(tmp_path, "n1")
    try:
        r: dict[str, Any] = a.w.build_report()
        assert r["handoff"][:2] == list(a.w.handoff_bound)  # type: ignore[arg-type]
        assert len(r["handoff"][2]) == 32 and "rwin" not in r  # nothing received yet
        assert a.w._handoff_key.hex() not in repr(a.record())
    finally:
        a.close()


def test_node_handoff_key_is_shared_by_the_nodes_workers(tmp_path: Path) -> None:
    def key_of(node: str, index: int) -> bytes:
        cfg = WorkerConfig(anycast="192.0.2.1", node=node, index=index, run_dir=tmp_path / node)
        (tmp_path / node).mkdir(exist_ok=True)
        return Worker(cfg)._node_handoff_key()

    k0, k1, other = key_of("n1", 0), key_of("n1", 1), key_of("n2", 0)
    assert k0 == k1 != other and len(k0) == 32
    assert (tmp_path / "n1" / "handoff.key").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in (tmp_path / "n1").iterdir()) == ["handoff.key"]
