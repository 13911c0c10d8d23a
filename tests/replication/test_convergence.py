"""Random interleavings of sets, deletes, losses and subscriber restarts: all converge."""

from __future__ import annotations

import zmq
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from replication.records import Record
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

KEYS = Keys(
    server=zmq.curve_keypair(),
    clients=[zmq.curve_keypair() for _ in range(4)],
    stranger=zmq.curve_keypair(),
)


def record(kind: int, n: int, version: int) -> Record:
    if kind == 0:
        return make_sa(0x1000 + n, generation=version)
    if kind == 1:
        return make_tunnel(n, mtu=1400 + version)
    return make_route(n, weight=1 + version)


class BusMachine(RuleBasedStateMachine):
    """A publisher and three subscribers (one tcp pair, one ipc-free late joiner)."""

    def __init__(self) -> None:
        super().__init__()
        self.bus = Bus(KEYS, ("tcp://127.0.0.1:*",) * 3)
        self.recs: dict[str, Recorder] = {}
        self.version = 0

    @initialize()
    def start(self) -> None:
        self.pub = self.bus.publisher(heartbeat_interval=0.05)
        self.subs = {}
        for i in range(2):
            self._start_sub(f"w{i}", i)

    def _start_sub(self, name: str, client: int) -> None:
        self.recs[name] = Recorder()
        self.subs[name] = self.bus.subscriber(
            name, client=client, recorder=self.recs[name], heartbeat_timeout=0.5
        )

    @rule(kind=st.integers(0, 2), n=st.integers(0, 5))
    def set_record(self, kind: int, n: int) -> None:
        self.version += 1
        self.pub.set(record(kind, n, self.version))

    @rule(kind=st.integers(0, 2), n=st.integers(0, 5))
    def delete_record(self, kind: int, n: int) -> None:
        self.pub.delete(record(kind, n, 0).key)

    @rule(count=st.integers(1, 3))
    def lose_updates(self, count: int) -> None:
        self.pub.inject_loss(count)

    @rule(name=st.sampled_from(["w0", "w1", "late"]))
    def restart_subscriber(self, name: str) -> None:
        if name in self.subs:
            self.bus.stop(self.subs.pop(name))
        self._start_sub(name, {"w0": 0, "w1": 1, "late": 2}[name])

    @invariant()
    def never_ahead(self) -> None:
        for s in self.subs.values():
            assert s.applied_seq <= self.pub.sequence

    def teardown(self) -> None:
        try:
            if hasattr(self, "pub"):
                self.pub.set(make_tunnel(99))  # a last update after any injected loss
                subs = list(self.subs.values())
                assert wait_until(lambda: converged(self.pub, *subs), timeout=5)
                want = self.pub.items()
                for name, s in self.subs.items():
                    rec = self.recs[name]
                    # Every key present was reported; nothing reported is missing
                    # without a matching delete.
                    assert set(want) <= set(rec.sets)
                    assert s.state == want
        finally:
            self.bus.close()


BusMachine.TestCase.settings = settings(max_examples=8, stateful_step_count=25, deadline=None)
TestBusConvergence = BusMachine.TestCase
