"""Passing TUN queue fds between the workers of a node (``Worker.TUN_STEER``).

In-process: a worker that is not started, its AF_UNIX queue socket, and a
test socket that plays the peer, passing pipe fds (any fd stands in for a
queue here; nothing is written). What a user would notice if this broke:
a resend every few seconds that forgets every flow cache, a reopened queue
whose old copy stays open (a TUN queue nobody reads), or fds leaking.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from dataplane.worker import AccountNet, Worker, WorkerConfig

ACCOUNT = "a" * 32


def _fds() -> int:
    """Open fds of this process (each listing sees its own directory fd once)."""
    return len(os.listdir("/proc/self/fd"))


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def worker(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = WorkerConfig(anycast="192.0.2.1", index=0, workers=2, run_dir=tmp_path, metrics_port=0)
    w = Worker(cfg)
    w._open_tunq()
    w.dp.attach_account(AccountNet(ACCOUNT, lambda d: None))
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield w, peer
    peer.close()
    w.close()


def _pass(w: Worker, peer: socket.socket, text: str, fd: int | None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
    peer.sendmsg([text.encode()], anc, 0, w._tunq_addr(0))
    w._drain_tunq()


def test_a_resend_keeps_the_held_queue_and_a_reopened_one_replaces_it(worker) -> None:  # type: ignore[no-untyped-def]
    w, peer = worker
    me = os.getpid()  # the "peer process" must be alive: the test itself
    r1, w1 = os.pipe()
    _pass(w, peer, f"1 {me} 1 {ACCOUNT}", r1)
    assert list(w.dp.peer_writers) == [(ACCOUNT, 1)]  # node-local election ids
    held_fd, writer = w._peer_q[(ACCOUNT, 1)][:2]
    w.dp.flow_cache(ACCOUNT)[42] = None  # a remembered flow decision
    w.dp.inbound_writer("t" * 32, w.dp.accounts[ACCOUNT])  # and a steering one

    # the same queue again (the 5 s resend): the new copy is closed at once,
    # ours is kept, and nothing the worker remembered about flows is lost
    before = _fds()
    r2, w2 = os.pipe()
    _pass(w, peer, f"1 {me} 1 {ACCOUNT}", r2)
    assert w._peer_q[(ACCOUNT, 1)][:2] == (held_fd, writer) and _open(held_fd)
    assert 42 in w.dp.flow_cache(ACCOUNT) and w.dp._steer
    assert _fds() == before + 2  # our pipe's two ends; the passed copy was closed

    # the peer reopened its queue (generation 2): the old copy goes
    r3, w3 = os.pipe()
    _pass(w, peer, f"1 {me} 2 {ACCOUNT}", r3)
    new_fd = w._peer_q[(ACCOUNT, 1)][0]
    assert w._peer_q[(ACCOUNT, 1)][3] == 2 and w.dp.peer_writers[(ACCOUNT, 1)] is not writer
    assert not w.dp.flow_cache(ACCOUNT) and _open(new_fd)
    assert w.metrics.peer_queues._value.get() == 1  # type: ignore[attr-defined]
    for fd in (r1, r2, r3, w1, w2, w3):  # ours; the worker holds copies
        os.close(fd)


@pytest.mark.parametrize(
    "text",
    [
        "0 {pid} 1 " + ACCOUNT,  # our own index
        "2 {pid} 1 " + ACCOUNT,  # no such worker (workers=2)
        "1 {pid} 1 " + "b" * 32,  # an account we do not have
        "1 999999999 1 " + ACCOUNT,  # a process that does not exist
        "1 {pid} x " + ACCOUNT,  # malformed
        "junk",
    ],
)
def test_unusable_passes_are_closed_and_change_nothing(worker, text: str) -> None:  # type: ignore[no-untyped-def]
    w, peer = worker
    r, wr = os.pipe()
    before = _fds()
    _pass(w, peer, text.format(pid=os.getpid()), r)
    assert not w._peer_q and not w.dp.peer_writers
    assert _fds() == before  # the passed copy is closed
    _pass(w, peer, f"1 {os.getpid()} 1 {ACCOUNT}", None)  # no fd at all
    assert not w._peer_q
    os.close(r)
    os.close(wr)


def test_a_sibling_killed_is_failed_over_at_once_not_at_the_next_housekeeping(
    tmp_path: Path,
) -> None:
    """The survivor watches every live sibling with a pidfd: when one is
    SIGKILLed, the pidfd's event alone (no housekeeping tick) takes the dead
    worker out of the election and hands its replay-protected outbound SA to
    the survivor, so traffic moves in milliseconds instead of up to 0.25 s."""
    import dataclasses
    import signal
    import subprocess
    import sys
    import time

    from dataplane.worker import NodePeers, _NotOwner, rendezvous_owner
    from replication.records import Direction

    from ._worker_records import route, sa, tunnel

    cfg = WorkerConfig(anycast="192.0.2.1", index=0, workers=2, run_dir=tmp_path, metrics_port=0)
    w = Worker(cfg)
    w.peers = NodePeers(tmp_path, 0, 2)
    spi = next(s for s in range(0x3000, 0x3100) if rendezvous_owner(s, (0, 1)) == 1)
    t = dataclasses.replace(tunnel(1), replay_protection=True)
    out = sa(spi, Direction.OUT, udp_encap=True)
    for rec in (t, route(1, "10.2.0.0/24", 1), out):
        w.dp.apply(rec.key, rec)
    sibling = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from dataplane.worker import NodePeers;"
         f"p = NodePeers(Path({str(tmp_path)!r}), 1, 2); print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert sibling.stdout is not None and sibling.stdout.readline().strip() == "up"
        w._update_share()
        w.manage_owned_sas()
        entry = w.dp.sad.outbound[t.tunnel_id][0]
        assert w.dp.live == (0, 1) and 1 in w._peer_watch
        assert entry.codec.__class__ is _NotOwner  # worker 1 owns it: we do not send
        sibling.send_signal(signal.SIGKILL)
        sibling.wait(5)
        deadline = time.monotonic() + 2
        while 1 in w._peer_watch and time.monotonic() < deadline:
            for fd, _ev in w.ep.poll(0.1):  # only the pidfd's event; no housekeeping
                w.handlers[fd]()
        assert w.dp.live == (0,)
        assert entry.codec.__class__ is not _NotOwner  # ours now: we send
    finally:
        if sibling.poll() is None:
            sibling.kill()
            sibling.wait(5)
        w.close()
