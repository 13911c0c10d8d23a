"""IKE relay over CURVE: round trip, reply routing, fallback, authentication."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from replication.relay import DGRAM, IkeDatagram, RelayClient, RelayError, RelayServer
from tests.replication.conftest import Keys, wait_until


class Collector:
    def __init__(self) -> None:
        self.items: list[IkeDatagram] = []
        self.lock = threading.Lock()

    def __call__(self, d: IkeDatagram) -> None:
        with self.lock:
            self.items.append(d)


@pytest.fixture
def server(keys: Keys) -> Iterator[tuple[RelayServer, Collector]]:
    got = Collector()
    srv = RelayServer(
        endpoint="tcp://127.0.0.1:*",
        server_public=keys.server[0],
        server_secret=keys.server[1],
        allowed_clients=[c[0] for c in keys.clients],
        worker_timeout=1.0,
    )
    srv.on_datagram = got
    srv.start()
    try:
        yield srv, got
    finally:
        srv.stop()


def client(srv: RelayServer, keys: Keys, wid: str, n: int) -> tuple[RelayClient, Collector]:
    got = Collector()
    pub, sec = keys.stranger if n < 0 else keys.clients[n]
    c = RelayClient(
        endpoint=srv.endpoint,
        server_public=keys.server[0],
        client_public=pub,
        client_secret=sec,
        worker_id=wid,
        on_reply=got,
        ping_interval=0.1,
    )
    c.start()
    return c, got


def dgram(wid: str, data: bytes, port: int = 500) -> IkeDatagram:
    return IkeDatagram(wid, data, "203.0.113.1", port, "198.51.100.7", 40123)


def reply_to(d: IkeDatagram, data: bytes) -> IkeDatagram:
    return IkeDatagram(d.worker_id, data, d.local_addr, d.local_port, d.remote_addr, d.remote_port)


def test_round_trip_and_reply_routing(server: tuple[RelayServer, Collector], keys: Keys) -> None:
    srv, got = server
    (c1, r1), (c2, r2) = client(srv, keys, "w1", 0), client(srv, keys, "w2", 1)
    try:
        assert wait_until(lambda: sorted(srv.live_workers()) == ["w1", "w2"])
        ike = bytes(range(256)) * 4
        c1.forward(dgram("w1", ike))
        c2.forward(dgram("w2", b"\x01" * 28, port=4500))
        assert wait_until(lambda: len(got.items) == 2)
        by_worker = {d.worker_id: d for d in got.items}
        assert by_worker["w1"] == dgram("w1", ike)
        assert by_worker["w2"].local_port == 4500
        for d in got.items:
            srv.send(reply_to(d, b"reply-" + d.worker_id.encode()))
        assert wait_until(lambda: len(r1.items) == 1 and len(r2.items) == 1)
        assert r1.items[0].data == b"reply-w1" and r2.items[0].data == b"reply-w2"
        assert r1.items[0].remote_port == 40123
        # w1 goes away: its replies now leave through w2.
        c1.stop()
        # A reply sent in the instant before ZeroMQ notices the disconnect is
        # lost (the IKE initiator retransmits, RFC 7296 §2.1); give it that instant.
        time.sleep(0.1)
        srv.send(reply_to(by_worker["w1"], b"late"))
        assert wait_until(lambda: len(r2.items) == 2)
        assert r2.items[1].data == b"late" and r2.items[1].worker_id == "w1"
        dropped = srv.metrics.registry.get_sample_value
        assert dropped("anywan_bus_relay_datagrams_total", {"direction": "to_control"}) == 2
    finally:
        c1.stop()
        c2.stop()


def test_worker_cannot_claim_another_id(server: tuple[RelayServer, Collector], keys: Keys) -> None:
    srv, got = server
    c, _ = client(srv, keys, "honest", 0)
    try:
        c.forward(dgram("someone-else", b"x" * 40))
        assert wait_until(lambda: len(got.items) == 1)
        assert got.items[0].worker_id == "honest"
    finally:
        c.stop()


def test_no_live_worker_drops_and_counts(server: tuple[RelayServer, Collector]) -> None:
    srv, _ = server
    srv.send(dgram("nobody", b"x" * 40))
    reg = srv.metrics.registry
    assert wait_until(
        lambda: reg.get_sample_value("anywan_bus_relay_dropped_total", {"reason": "no_worker"}) == 1
    )


def test_wrong_key_gets_nothing(server: tuple[RelayServer, Collector], keys: Keys) -> None:
    srv, got = server
    bad, bad_got = client(srv, keys, "intruder", -1)
    good, good_got = client(srv, keys, "w1", 0)
    try:
        bad.forward(dgram("intruder", b"evil" * 10))
        good.forward(dgram("w1", b"good" * 10))
        assert wait_until(lambda: len(got.items) == 1)
        srv.send(dgram("intruder", b"secret reply"))
        assert wait_until(lambda: len(good_got.items) == 1)  # falls back to the live one
        time.sleep(0.3)
        assert [d.worker_id for d in got.items] == ["w1"]
        assert not bad_got.items
        assert srv.live_workers() == ["w1"]
    finally:
        bad.stop()
        good.stop()


def test_malformed_relay_messages_counted(
    server: tuple[RelayServer, Collector], keys: Keys
) -> None:
    srv, got = server
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = b"raw"
        s.curve_serverkey = keys.server[0]
        s.curve_publickey, s.curve_secretkey = keys.clients[2]
        s.connect(srv.endpoint)
        s.send_multipart([DGRAM, b"\xc1not msgpack"])
        s.send_multipart([DGRAM, dgram("raw", b"x").to_wire()[:-3]])
        s.send_multipart([DGRAM])
        s.send_multipart([DGRAM, dgram("raw", b"ok" * 10).to_wire()])
        assert wait_until(lambda: len(got.items) == 1)
        reg = srv.metrics.registry
        assert reg.get_sample_value("anywan_bus_relay_dropped_total", {"reason": "malformed"}) == 3
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x90",
        IkeDatagram("w", b"x", "not-an-ip", 500, "1.2.3.4", 1).to_wire(),
        IkeDatagram("w", b"x", "1.2.3.4", 0, "1.2.3.4", 1).to_wire(),
        IkeDatagram("w", b"", "1.2.3.4", 500, "1.2.3.4", 1).to_wire(),
    ],
)
def test_datagram_validation(raw: bytes) -> None:
    with pytest.raises(RelayError):
        IkeDatagram.from_wire(raw)
