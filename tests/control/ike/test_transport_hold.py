"""``IkeTransport.hold``: an event handler keeps the datagrams of its flush (and
every later one, in order) back until something is done — control holds the
answer that tells the peer about a new Child SA until every worker has it, so
the peer's first packets on it are not dropped as unknown SPIs."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from control.ike import transport as transport_mod
from control.ike.transport import IkeTransport
from deploy.netns import LoopThread

from .test_interop_transport import IKE_MSG, EchoEngine, FakeDatagram, FakeRelay, wait_until


def datagram(n: int) -> FakeDatagram:
    return FakeDatagram("w1", IKE_MSG + bytes([n]), "203.0.113.1", 500, "198.51.100.7", 500)


class Rig:
    def __init__(self) -> None:
        self.engine, self.relay = EchoEngine(), FakeRelay()
        self.lt = LoopThread(None).start()
        self.gates: list[asyncio.Future[None]] = []
        self.hold_for: set[int] = set()
        self.transport = IkeTransport(self.engine, on_event=self.on_event, loop=self.lt.loop)
        self.lt.call(lambda: self.transport.attach_relay(self.relay, datagram_factory=FakeDatagram))

    def on_event(self, event: object) -> None:
        """Message n (its last octet) is held if ``feed(n, hold=True)``; the
        engine's timer events never are."""
        if event[0] == "rx" and self.engine.received[-1][0][-1] in self.hold_for:  # type: ignore[index]
            gate: asyncio.Future[None] = self.lt.loop.create_future()
            self.gates.append(gate)
            self.transport.hold(gate)

    def feed(self, n: int, *, hold: bool = False) -> None:
        if hold:
            self.hold_for.add(n)
        before = len(self.engine.received)
        self.relay.on_datagram(datagram(n))
        assert wait_until(lambda: len(self.engine.received) > before)  # handled, in order

    def sent(self) -> list[bytes]:
        return self.lt.call(lambda: [d.data for d in self.relay.sent if d.data != b"T"])

    def close(self) -> None:
        self.lt.call(self.transport.close)
        self.lt.stop()


@pytest.fixture
def rig() -> Any:
    r = Rig()
    yield r
    r.close()


def test_held_answers_go_out_when_the_hold_is_done_in_their_order(rig: Rig) -> None:
    rig.feed(0)
    assert wait_until(lambda: len(rig.sent()) == 1)  # no hold: at once
    rig.feed(1, hold=True)  # its handler holds
    rig.feed(2)  # queued behind it, though nobody holds it
    time.sleep(0.2)
    assert rig.sent() == [b"R" + IKE_MSG + b"\x00"]
    rig.lt.call(rig.gates[0].set_result, None)
    assert wait_until(lambda: len(rig.sent()) == 3)
    assert rig.sent()[1:] == [b"R" + IKE_MSG + b"\x01", b"R" + IKE_MSG + b"\x02"]
    assert rig.transport.stats["held"] == 1 and rig.transport.stats["hold_timeout"] == 0
    rig.feed(3)  # and nothing is held any more
    assert wait_until(lambda: len(rig.sent()) == 4)


def test_a_later_hold_does_not_keep_back_what_an_earlier_one_released(rig: Rig) -> None:
    """No starvation under a stream of holds (an IKE_AUTH storm): each answer
    waits for its own hold and the ones before it, never for later ones."""
    rig.feed(1, hold=True)
    rig.feed(2, hold=True)
    time.sleep(0.1)
    assert rig.sent() == []
    rig.lt.call(rig.gates[0].set_result, None)
    assert wait_until(lambda: len(rig.sent()) == 1)
    time.sleep(0.1)
    assert rig.sent() == [b"R" + IKE_MSG + b"\x01"]
    rig.lt.call(rig.gates[1].set_result, None)
    assert wait_until(lambda: len(rig.sent()) == 2)
    assert rig.transport.stats["held"] == 2


def test_a_hold_that_never_ends_is_bounded(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_mod, "MAX_HOLD", 0.3)
    t0 = time.monotonic()
    rig.feed(1, hold=True)
    assert wait_until(lambda: len(rig.sent()) == 1)
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert rig.transport.stats["hold_timeout"] == 1


def test_a_failing_hold_releases_too(rig: Rig) -> None:
    rig.feed(1, hold=True)
    time.sleep(0.1)
    assert rig.sent() == []
    rig.lt.call(rig.gates[0].set_exception, RuntimeError("bus gone"))
    assert wait_until(lambda: len(rig.sent()) == 1)


def test_closing_while_held_sends_nothing(rig: Rig) -> None:
    rig.feed(1, hold=True)
    time.sleep(0.1)
    rig.lt.call(rig.transport.close)
    time.sleep(0.2)
    assert rig.sent() == []


def test_on_flush_runs_after_the_events_and_before_the_answer_is_sent() -> None:
    """Control's hook to write what the flush touched (write-ahead): called
    once the events of a received datagram were dispatched, before the answer
    to it leaves."""
    engine, relay = EchoEngine(), FakeRelay()
    lt = LoopThread(None).start()
    seen: list[tuple[str, int]] = []

    def answers() -> int:
        return len([d for d in relay.sent if d.data.startswith(b"R")])

    transport = IkeTransport(
        engine,
        on_event=lambda ev: seen.append(("event", answers())),
        on_flush=lambda: seen.append(("flush", answers())),
        loop=lt.loop,
    )
    try:
        lt.call(lambda: transport.attach_relay(relay, datagram_factory=FakeDatagram))
        relay.on_datagram(datagram(1))
        assert wait_until(lambda: lt.call(answers) == 1)
        assert lt.call(lambda: list(seen))[:2] == [("event", 0), ("flush", 0)]
    finally:
        lt.call(transport.close)
        lt.stop()
