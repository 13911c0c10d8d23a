"""Replicated sequence checkpoints (DESIGN §5): a replay-protected SA's new
owner on another node (another run dir, no shared file) never reuses a
sequence number the old owner sent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.ipsec import ESP

from control.service import max_seq_checkpoints
from dataplane.worker import SEQ_RESERVATION, AccountNet, Worker, WorkerConfig
from replication.records import Direction, SeqCheckpoint, decode, encode

from ._worker_records import ACCOUNT_A, route, sa, tunnel

T = replace(tunnel(1), replay_protection=True)
OUT = sa(0x2001, Direction.OUT, udp_encap=True, remote_port=4501)
PKT = bytes(IP(src="10.1.0.2", dst="10.2.0.9") / ICMP())


class Node:
    """One worker (index 0, alone on its node) with the tunnel applied; what it
    sends is kept, nothing touches a socket."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)  # Worker.start makes it
        self.w = Worker(WorkerConfig(anycast="192.0.2.1", run_dir=run_dir, metrics_port=0))
        self.sent: list[bytes] = []
        send = lambda d, a, anc: self.sent.append(bytes(d))  # noqa: E731
        self.w.dp.send_esp = self.w.dp.send_udp = send
        for rec in (T, route(1, "10.2.0.0/24", 1), OUT):
            self.w.dp.apply(rec.key, rec)
        self.net = AccountNet(ACCOUNT_A, lambda d: None)
        self.w.dp.attach_account(self.net)

    def send(self, n: int) -> list[int]:
        """Send ``n`` packets on the SA; their ESP sequence numbers (scapy)."""
        start = len(self.sent)
        self.w.manage_owned_sas()
        for _ in range(n):
            self.w.dp.outbound(self.net, memoryview(PKT))
        return [ESP(p).seq for p in self.sent[start:]]

    def checkpoint_from(self, other: Node) -> None:
        """What control does with ``other``'s report, through the bus encoding."""
        for (tid, spi), nxt in max_seq_checkpoints([other.w.build_report()]).items():
            rec = decode(encode(SeqCheckpoint(ACCOUNT_A, tid, spi, nxt)))
            self.w._apply_checkpoint(rec.key, rec)


def test_new_owner_on_another_node_resumes_above_the_old_owner(tmp_path: Path) -> None:
    a, b = Node(tmp_path / "node-a"), Node(tmp_path / "node-b")
    sent_a = a.send(5)
    assert sent_a == [1, 2, 3, 4, 5]
    # Node A's owner reports its reservation; control replicates it to B.
    report = a.w.build_report()
    assert report["seq"] == {T.tunnel_id: {OUT.spi: SEQ_RESERVATION + 1}}
    b.checkpoint_from(a)
    sent_b = b.send(3)
    assert min(sent_b) > max(sent_a) and sent_b == sorted(sent_b)
    assert min(sent_b) > SEQ_RESERVATION  # above all A may have sent unreported


def test_without_the_checkpoint_another_node_would_reuse_numbers(tmp_path: Path) -> None:
    """The failure the checkpoint prevents (node-local files only)."""
    a, b = Node(tmp_path / "node-a"), Node(tmp_path / "node-b")
    assert b.send(2)[0] <= max(a.send(5))


def test_running_owner_jumps_above_a_foreign_checkpoint(tmp_path: Path) -> None:
    """Traffic moved A → B → A: A's owner was idle while B sent; B's
    checkpoint reaching A makes A continue above B, not at its own counter."""
    a, b = Node(tmp_path / "node-a"), Node(tmp_path / "node-b")
    a.send(3)
    b.checkpoint_from(a)
    sent_b = b.send(4)
    a.checkpoint_from(b)
    sent_a = a.send(2)
    assert min(sent_a) > max(sent_b)
    # A's own (echoed) checkpoint does not make it jump again.
    a.checkpoint_from(a)
    again = a.send(1)
    assert again == [max(sent_a) + 1]


def test_same_node_takeover_still_uses_the_local_file(tmp_path: Path) -> None:
    a = Node(tmp_path / "node")
    sent = a.send(3)
    a2 = Node(tmp_path / "node")  # another life on the same node, no checkpoint yet
    assert min(a2.send(2)) > max(sent)


def test_checkpoint_survives_its_tombstone_until_the_sa_goes(tmp_path: Path) -> None:
    """A restarted control's snapshot lacks the checkpoints until the owners
    report again: the worker keeps the highest one it saw meanwhile."""
    a, b = Node(tmp_path / "node-a"), Node(tmp_path / "node-b")
    sent_a = a.send(3)
    b.checkpoint_from(a)
    key = f"seq/{T.tunnel_id}/{OUT.spi:08x}"
    b.w._apply_checkpoint(key, None)  # the tombstone of a control restart
    lower = SeqCheckpoint(ACCOUNT_A, T.tunnel_id, OUT.spi, 2)
    b.w._apply_checkpoint(key, lower)  # never lowered either
    assert min(b.send(2)) > max(sent_a) + SEQ_RESERVATION
    b.w.dp.remove(OUT.key)
    b.w.manage_owned_sas()
    assert b.w._checkpoints == {}
