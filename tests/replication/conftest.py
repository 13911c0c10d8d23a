"""Shared fixtures for the bus tests: real CURVE keys, real sockets, bounded waits."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from replication.publisher import Publisher
from replication.records import (
    Cipher,
    Direction,
    Integ,
    Record,
    RouteRecord,
    SaRecord,
    TrafficSelector,
    TunnelKind,
    TunnelRecord,
)
from replication.subscriber import Subscriber

TUNNEL_ID = "f5407d8db1a542b196c59f6d04ba8bd1"


def make_sa(spi: int, *, generation: int = 1, direction: Direction = Direction.IN) -> SaRecord:
    return SaRecord(
        account_id="acct1",
        tunnel_id=TUNNEL_ID,
        spi=spi,
        direction=direction,
        local_addr="203.0.113.1",
        remote_addr="198.51.100.7",
        udp_encap=False,
        local_port=0,
        remote_port=0,
        cipher=Cipher.AES256GCM16,
        integ=Integ.NONE,
        enc_key=spi.to_bytes(4, "big") * 8,
        salt=b"salt",
        integ_key=b"",
        replay_window=0,
        ts_local=(TrafficSelector.from_network("10.0.0.0/8"),),
        ts_remote=(TrafficSelector.from_network("192.168.1.0/24"),),
        child_id=1,
        generation=generation,
        created=1_700_000_000.0,
        rekey_at=0,
        expire_at=0,
    )


def make_tunnel(n: int, mtu: int = 1476) -> TunnelRecord:
    return TunnelRecord(
        account_id="acct1",
        tunnel_id=f"{n:032x}",
        kind=TunnelKind.GRE,
        name=f"t{n}",
        local_addr="203.0.113.1",
        remote_addr="198.51.100.9",
        interface_address="10.200.0.0/31",
        mtu=mtu,
    )


def make_route(n: int, weight: int = 100) -> RouteRecord:
    return RouteRecord(
        account_id="acct1",
        route_id=f"{n:032x}",
        prefix="10.1.0.0/24",
        tunnel_id=TUNNEL_ID,
        weight=weight,
    )


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@dataclass
class Keys:
    server: tuple[bytes, bytes]
    clients: list[tuple[bytes, bytes]]
    stranger: tuple[bytes, bytes]


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        server=zmq.curve_keypair(),
        clients=[zmq.curve_keypair() for _ in range(4)],
        stranger=zmq.curve_keypair(),
    )


@dataclass
class Recorder:
    """Counts callbacks per key: proves nothing is applied twice."""

    sets: Counter[str] = field(default_factory=Counter)
    deletes: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_set(self, key: str, rec: Record) -> None:
        with self.lock:
            self.sets[key] += 1
            self.log.append(("set", key))

    def on_delete(self, key: str, old: Record | None) -> None:
        with self.lock:
            self.deletes[key] += 1
            self.log.append(("del", key))


class Bus:
    """Starts publishers and subscribers on given endpoints; stops them all."""

    def __init__(self, keys: Keys, endpoints: tuple[str, str, str]) -> None:
        self.keys = keys
        self.endpoints = endpoints
        self.started: list[Publisher | Subscriber] = []

    def publisher(self, **kw: object) -> Publisher:
        snap, upd, ack = self.endpoints
        pub = Publisher(
            snapshot_endpoint=snap,
            update_endpoint=upd,
            ack_endpoint=ack,
            server_public=self.keys.server[0],
            server_secret=self.keys.server[1],
            allowed_clients=[c[0] for c in self.keys.clients],
            heartbeat_interval=kw.pop("heartbeat_interval", 0.1),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )
        pub.start()
        self.started.append(pub)
        # Pin wildcard ports so a restarted publisher binds the same ones.
        self.endpoints = (pub.snapshot_endpoint, pub.update_endpoint, pub.ack_endpoint)
        return pub

    def subscriber(
        self, worker_id: str, *, client: int = 0, recorder: Recorder | None = None, **kw: object
    ) -> Subscriber:
        snap, upd, ack = self.endpoints
        pub_key, sec_key = self.keys.stranger if client < 0 else self.keys.clients[client]
        sub = Subscriber(
            snapshot_endpoint=snap,
            update_endpoint=upd,
            ack_endpoint=ack,
            server_public=self.keys.server[0],
            client_public=pub_key,
            client_secret=sec_key,
            worker_id=worker_id,
            on_set=recorder.on_set if recorder else None,
            on_delete=recorder.on_delete if recorder else None,
            heartbeat_timeout=kw.pop("heartbeat_timeout", 1.0),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )
        sub.start()
        self.started.append(sub)
        return sub

    def stop(self, obj: Publisher | Subscriber) -> None:
        obj.stop()
        if obj in self.started:
            self.started.remove(obj)

    def close(self) -> None:
        for obj in reversed(self.started):
            obj.stop()
        self.started.clear()


@pytest.fixture(params=["tcp", "ipc"])
def bus(request: pytest.FixtureRequest, keys: Keys, tmp_path: Path) -> Iterator[Bus]:
    if request.param == "tcp":
        eps = ("tcp://127.0.0.1:*",) * 3
    else:
        eps = tuple(f"ipc://{tmp_path}/{n}.sock" for n in ("snap", "upd", "ack"))
    b = Bus(keys, eps)  # type: ignore[arg-type]
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def tcp_bus(keys: Keys) -> Iterator[Bus]:
    b = Bus(keys, ("tcp://127.0.0.1:*",) * 3)
    try:
        yield b
    finally:
        b.close()


def converged(pub: Publisher, *subs: Subscriber) -> bool:
    want = pub.items()
    return all(s.ready.is_set() and s.state == want for s in subs)
