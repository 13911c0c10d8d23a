"""control/ike/transport.py with a stand-in engine, on real UDP sockets inside a
namespace (prefix ``awt-i-t-``), on asyncio and on uvloop: the non-ESP marker,
keepalives and ESP on 4500, the timer, events, and the relay path."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from control.ike.transport import IkeTransport, classify_4500
from deploy.netns import LoopThread, Topology

Address = tuple[str, int]
IKE_MSG = bytes(range(28)) + b"payload"  # 28-octet header + body, not all zero


class EchoEngine:
    """Answers every message with b"R" + message from the same local address,
    arms a timer 50 ms after the first message that sends b"T" to that peer,
    and emits one event per input."""

    def __init__(self) -> None:
        self.config = type("Cfg", (), {"unix_time_offset": 0.0})()
        self.received: list[tuple[bytes, Address, Address, float]] = []
        self.out: list[tuple[bytes, Address, Address]] = []
        self.events: list[object] = []
        self.timer: float | None = None
        self.timer_peer: tuple[Address, Address] | None = None
        self.thread_ids: set[int] = set()

    def receive_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        self.thread_ids.add(threading.get_ident())
        self.received.append((data, local, remote, now))
        self.out.append((b"R" + data, local, remote))
        self.events.append(("rx", local, remote))
        if self.timer is None and self.timer_peer is None:
            self.timer, self.timer_peer = now + 0.05, (local, remote)

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]:
        out, self.out = self.out, []
        return out

    def get_timer(self) -> float | None:
        return self.timer

    def handle_timer(self, now: float) -> None:
        assert self.timer is not None and now >= self.timer and self.timer_peer
        self.timer = None
        self.out.append((b"T", *self.timer_peer))
        self.events.append(("timer",))

    def next_event(self) -> object | None:
        return self.events.pop(0) if self.events else None


@dataclass(frozen=True)
class FakeDatagram:
    worker_id: str
    data: bytes
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int


class FakeRelay:
    def __init__(self) -> None:
        self.on_datagram: Any = None
        self.sent: list[FakeDatagram] = []

    def send(self, reply: FakeDatagram) -> None:
        self.sent.append(reply)


def test_classify_4500() -> None:
    assert classify_4500(b"\xff") == "keepalive"
    assert classify_4500(b"\x00\x00\x00\x00" + IKE_MSG) == "ike"
    assert classify_4500(b"\x12\x34\x56\x78" + b"\x00" * 20) == "esp"
    assert classify_4500(b"\x00\x00") == "short"
    assert classify_4500(b"") == "short"


def wait_until(pred: Any, timeout: float = 3.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    return pred()


@pytest.mark.netns
@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_transport_on_udp_500_and_4500(netns_topology, use_uvloop: bool) -> None:
    topo: Topology = netns_topology("awt-i-t-")
    gw, peer = topo.namespace("gw"), topo.namespace("peer")
    topo.veth(gw, "g0", peer, "p0", addr_a="192.0.2.10/24", addr_b="192.0.2.20/24")
    engine = EchoEngine()
    events: list[object] = []
    lt = gw.loop_thread(use_uvloop=use_uvloop)
    transport = IkeTransport(engine, on_event=events.append, loop=lt.loop)
    lt.run(transport.listen("192.0.2.10"))
    assert abs(engine.config.unix_time_offset - (time.time() - lt.call(lt.loop.time))) < 1

    client = peer.popen(
        [sys.executable, "-c", PEER_SCRIPT, "192.0.2.10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = client.communicate(timeout=20)
    lines = out.split()
    # Port 500: plain IKE in, plain reply out, then the timer's message.
    assert lines[0] == "500:R" + IKE_MSG.hex()
    assert lines[1] == "500:T"
    # Port 4500: marker stripped before the engine, added on the reply.
    assert lines[2] == "4500:00000000" + (b"R" + IKE_MSG).hex()
    # Keepalive, ESP and a short datagram got no answer (the peer saw a timeout).
    assert lines[3:] == ["4500:timeout"]
    datas = [(d, local[1], remote[0]) for d, local, remote, _ in engine.received]
    assert datas == [(IKE_MSG, 500, "192.0.2.20"), (IKE_MSG, 4500, "192.0.2.20")]
    assert engine.thread_ids == {lt._thread.ident}
    assert transport.stats["drop_keepalive"] == 1 and transport.stats["drop_esp"] == 1
    assert transport.stats["drop_short"] == 1
    assert ("timer",) in events and events.count(("timer",)) == 1
    assert transport.stats["tx_direct"] == 3
    lt.call(transport.close)


# Sends one IKE message to 500, waits for the reply and the timer message,
# then on 4500: marker+IKE, keepalive, ESP, a 2-byte datagram; prints what came back.
PEER_SCRIPT = r"""
import socket, sys
dst = sys.argv[1]
msg = bytes(range(28)) + b"payload"
s = socket.socket(2, 2); s.settimeout(2); s.bind(("0.0.0.0", 500))
s.sendto(msg, (dst, 500))
for _ in range(2):
    print("500:" + (lambda d: d[:1].decode() + d[1:].hex())(s.recvfrom(2000)[0]))
t = socket.socket(2, 2); t.settimeout(1); t.bind(("0.0.0.0", 4500))
t.sendto(b"\0\0\0\0" + msg, (dst, 4500))
print("4500:" + t.recvfrom(2000)[0].hex())
t.sendto(b"\xff", (dst, 4500))
t.sendto(b"\x12\x34\x56\x78" + b"\0" * 40, (dst, 4500))
t.sendto(b"\0\0", (dst, 4500))
try:
    print("4500:" + t.recvfrom(2000)[0].hex())
except socket.timeout:
    print("4500:timeout")
"""


@pytest.mark.netns
def test_relay_datagrams_reach_engine_and_replies_go_back_through_relay(netns_topology) -> None:
    topo: Topology = netns_topology("awt-i-t-")
    gw, peer = topo.namespace("gw"), topo.namespace("peer")
    topo.veth(gw, "g0", peer, "p0", addr_a="192.0.2.10/24", addr_b="192.0.2.20/24")
    engine, relay = EchoEngine(), FakeRelay()
    lt = gw.loop_thread()
    transport = IkeTransport(engine, loop=lt.loop)
    lt.run(transport.listen("192.0.2.10", ports=(4500,)))
    lt.call(lambda: transport.attach_relay(relay, datagram_factory=FakeDatagram))
    # The relay calls back from its own thread (here: this test thread).
    anycast = "203.0.113.1"
    relay.on_datagram(FakeDatagram("w2", IKE_MSG, anycast, 500, "198.51.100.7", 500))
    relay.on_datagram(FakeDatagram("w3", IKE_MSG, anycast, 4500, "198.51.100.7", 4500))
    relay.on_datagram(FakeDatagram("w3", b"short", anycast, 4500, "198.51.100.7", 4500))
    relay.on_datagram(object())
    assert wait_until(lambda: len(relay.sent) >= 3)
    first, second, timer_msg = relay.sent[:3]
    assert (first.worker_id, first.data, first.local_port) == ("w2", b"R" + IKE_MSG, 500)
    assert (second.worker_id, second.local_port, second.remote_port) == ("w3", 4500, 4500)
    # The engine's own request (the timer) goes to the worker that last carried that peer.
    assert (timer_msg.data, timer_msg.worker_id) == (b"T", "w2")
    assert transport.stats["drop_relay_malformed"] == 2
    # The same peer address then arrives directly on 4500: replies go direct.
    direct = peer.run(
        [
            sys.executable,
            "-c",
            "import socket;s=socket.socket(2,2);s.settimeout(2);s.bind(('0.0.0.0',4500))\n"
            "s.sendto(b'\\0\\0\\0\\0'+bytes(range(28))+b'payload',('192.0.2.10',4500))\n"
            "print(s.recvfrom(2000)[0][:5].hex())",
        ]
    )
    assert direct.stdout.strip() == "0000000052"  # marker + b"R"
    assert transport.stats["tx_relay"] == 3 and transport.stats["tx_direct"] == 1
    # An engine event for a peer we have no route to is counted, not raised.
    lt.call(engine.out.append, (b"x", ("10.0.0.9", 500), ("10.0.0.8", 500)))
    transport_without_relay = IkeTransport(engine, loop=lt.loop)
    lt.call(transport_without_relay.flush)
    assert transport_without_relay.stats["drop_no_route"] == 1
    lt.call(transport.close)


def test_real_relay_round_trip(tmp_path) -> None:
    """With the bus engineer's RelayServer/RelayClient over CURVE (loopback TCP):
    a worker's datagram reaches the engine, the answer and the engine's own
    timer-driven request go back to that worker."""
    from replication.curve import generate_keypair, load_secret
    from replication.relay import IkeDatagram, RelayClient, RelayServer

    server_pub, server_sec = load_secret(generate_keypair(tmp_path, "control")[1])
    worker_pub, worker_sec = load_secret(generate_keypair(tmp_path, "worker")[1])
    relay = RelayServer(
        endpoint="tcp://127.0.0.1:*",
        server_public=server_pub,
        server_secret=server_sec,
        allowed_clients=[worker_pub],
    )
    engine = EchoEngine()
    lt = LoopThread(None).start()
    transport = IkeTransport(engine, loop=lt.loop)
    lt.call(transport.attach_relay, relay)
    replies: list[IkeDatagram] = []
    relay.start()
    worker = RelayClient(
        endpoint=relay.endpoint,
        server_public=server_pub,
        client_public=worker_pub,
        client_secret=worker_sec,
        worker_id="node1-w0",
        on_reply=replies.append,
        ping_interval=0.1,
    )
    worker.start()
    try:
        sent = IkeDatagram("node1-w0", IKE_MSG, "203.0.113.1", 4500, "198.51.100.7", 61000)
        worker.forward(sent)
        assert wait_until(lambda: len(replies) >= 2, timeout=5), (replies, transport.stats)
        answer, timer_msg = replies[:2]
        assert answer == IkeDatagram(
            "node1-w0", b"R" + IKE_MSG, "203.0.113.1", 4500, "198.51.100.7", 61000
        )
        assert timer_msg.data == b"T" and timer_msg.remote_port == 61000
        assert engine.received[0][:3] == (IKE_MSG, ("203.0.113.1", 4500), ("198.51.100.7", 61000))
        assert engine.thread_ids == {lt._thread.ident}
    finally:
        worker.stop()
        relay.stop()
        lt.call(transport.close)
        lt.stop()


def test_a_deadline_the_engine_does_not_move_is_not_a_busy_loop(monkeypatch) -> None:
    """The transport re-arms at get_timer() with no guard of its own; the real
    engine must not leave a due deadline behind even when a handler fails (a
    bug, counted as internal_error in non-strict mode), or the loop would spin."""
    from control.ike.connection import IkeSa
    from control.ike.engine import IkeConfig

    from .pair import make_pair

    p = make_pair(config=IkeConfig(dpd_interval=5.0))
    p.connect()
    engine = p.server
    assert engine.ike_sas()

    def broken(self: IkeSa, now: float) -> None:
        raise RuntimeError("a bug in a timer handler")

    monkeypatch.setattr(IkeSa, "on_timer", broken)
    calls = [0]
    handle = engine.handle_timer

    def counting(now: float) -> None:
        calls[0] += 1
        handle(now)

    engine.handle_timer = counting  # type: ignore[method-assign]
    lt = LoopThread(None).start()
    try:
        transport = IkeTransport(engine, loop=lt.loop)
        lt.call(transport.flush)  # the pair's deadlines are long past on this clock
        time.sleep(0.5)
        n = lt.call(lambda: calls[0])
        # run once at once, then again only STUCK_TIMER_RETRY (1 s) later
        assert 1 <= n <= 2, n
        assert engine.drops["internal_error"] >= 1 and engine.drops["timer_stuck"] >= 1
        lt.call(transport.close)
    finally:
        lt.stop()
