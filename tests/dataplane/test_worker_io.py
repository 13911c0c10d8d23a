"""TUN and socket adapters in a namespace of our own (root needed)."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

import pytest

from dataplane import sockets, tun

from ._worker_netns_names import sweep_dead, unique_prefix

pytestmark = pytest.mark.netns
PREFIX = unique_prefix("io")


@pytest.fixture(autouse=True, scope="module")
def _sweep_crashed_runs() -> None:
    sweep_dead("io")


def _wait_readable(fds: list[int], timeout: float = 2.0) -> list[int]:
    r, _, _ = select.select(fds, [], [], timeout)
    return r


def test_multiqueue_tun_in_account_namespace(netns_topology) -> None:
    topo = netns_topology(PREFIX)
    ns = topo.namespace("acct")
    q1 = tun.open_queue("awtun0", netns_name=ns.name)
    q2 = tun.open_queue("awtun0", netns_name=ns.name)
    try:
        assert tun.device_exists("awtun0", netns_name=ns.name)
        assert not tun.device_exists("awtun0")  # not in the root namespace
        tun.TunConfig("awtun0", netns_name=ns.name).apply(
            mtu=1400, addresses=["10.100.0.0/31"], routes=["10.9.0.0/24", "fd00:9::/64"]
        )
        # a UDP datagram routed into the TUN comes out of one of the queues
        seen = b""
        for port in range(5000, 5008):  # several flows, the kernel picks queues
            ns.run(
                [
                    "python3",
                    "-c",
                    "import socket;s=socket.socket(2,2);"
                    f"s.sendto(b'hello-tun',('10.9.0.7',{port}))",
                ]
            )
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and seen.count(b"hello-tun") < 8:
            for fd in _wait_readable([q1, q2], 0.2):
                try:
                    while True:
                        seen += os.read(fd, 2048)
                except BlockingIOError:
                    pass
        assert seen.count(b"hello-tun") == 8
        # device goes away with its last queue
        os.close(q1)
        assert tun.device_exists("awtun0", netns_name=ns.name)
    finally:
        os.close(q2)
    assert not tun.device_exists("awtun0", netns_name=ns.name)


def test_open_queue_errors_are_readable() -> None:
    with pytest.raises(tun.TunError, match="1-15"):
        tun.open_queue("x" * 16)
    with pytest.raises(tun.TunError, match="namespace"):
        tun.open_queue("awtunx", netns_name="awt-x-io-does-not-exist")


def test_bind_to_absent_address_says_so(netns_topology) -> None:
    topo = netns_topology(PREFIX)
    ns = topo.namespace("node")
    with tun.in_netns(ns.name):
        with pytest.raises(sockets.SocketError, match="address not present"):
            sockets.open_raw(sockets.IPPROTO_ESP, "192.0.2.77")
        with pytest.raises(sockets.SocketError, match="address not present"):
            sockets.open_udp("192.0.2.77", 4500)


def test_raw_esp_share_filter_and_reuseport(netns_topology) -> None:
    topo = netns_topology(PREFIX)
    node = topo.namespace("node")
    peer = topo.namespace("peer")
    topo.veth(peer, "p0", node, "n0", addr_a="172.31.0.2/24", addr_b="172.31.0.1/24")
    with tun.in_netns(node.name):
        r0 = sockets.open_raw(sockets.IPPROTO_ESP, "172.31.0.1")
        r1 = sockets.open_raw(sockets.IPPROTO_ESP, "172.31.0.1")
        u0 = sockets.open_udp("172.31.0.1", 4500)
        u1 = sockets.open_udp("172.31.0.1", 4500)  # SO_REUSEPORT: both bind
    try:
        sockets.attach_share_filter(r0, sockets.IPPROTO_ESP, 0, 2)
        sockets.attach_share_filter(r1, sockets.IPPROTO_ESP, 1, 2)
        spis = list(range(0x1000, 0x1010))
        payloads = "".join(
            f"s.sendto(bytes.fromhex('{struct.pack('!II', spi, 1).hex()}')+b'x'*16,"
            "('172.31.0.1',0));"
            for spi in spis
        )
        peer.run(["python3", "-c", "import socket;s=socket.socket(2,3,50);" + payloads])
        got: dict[int, list[int]] = {0: [], 1: []}
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and len(got[0]) + len(got[1]) < len(spis):
            for i, s in enumerate((r0, r1)):
                try:
                    while True:
                        data = s.recv(2048)
                        ihl = (data[0] & 0xF) * 4
                        got[i].append(struct.unpack_from("!I", data, ihl)[0])
                except BlockingIOError:
                    pass
            time.sleep(0.02)
        assert sorted(got[0] + got[1]) == spis  # each packet exactly once
        assert all(spi % 2 == 0 for spi in got[0]) and all(spi % 2 == 1 for spi in got[1])
        sockets.attach_share_filter(r0, sockets.IPPROTO_ESP, 0, 1)  # sole survivor
        peer.run(["python3", "-c", "import socket;s=socket.socket(2,3,50);" + payloads])
        assert _wait_readable([r0.fileno()])
        time.sleep(0.2)
        n = 0
        try:
            while True:
                r0.recv(2048)
                n += 1
        except BlockingIOError:
            pass
        assert n == len(spis)
    finally:
        for s in (r0, r1, u0, u1):
            s.close()


def test_outer_socket_buffers_are_not_capped_by_rmem_max(
    netns_topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root asks for buffers beyond net.core.rmem_max / wmem_max and gets
    them (the kernel reports twice the size asked for), so a default
    sysctl does not silently shrink them to 208 KiB."""
    topo = netns_topology(PREFIX)
    node = topo.namespace("node")
    with open("/proc/sys/net/core/rmem_max") as fh:
        rmem_max = int(fh.read())
    want = 2 * max(rmem_max, sockets.SOCK_BUF)  # above the cap whatever it is
    monkeypatch.setattr(sockets, "SOCK_BUF", want)
    with tun.in_netns(node.name):
        sock = sockets.open_udp("127.0.0.1", 4500)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 2 * want
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * want
    finally:
        sock.close()


def test_gso_batcher_sends_segments(netns_topology) -> None:
    topo = netns_topology(PREFIX)
    node = topo.namespace("node")
    with tun.in_netns(node.name):
        node_addr = "127.0.0.1"
        tx = sockets.open_udp(node_addr, 4500)
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((node_addr, 4600))
    try:
        b = sockets.GsoBatcher(tx)
        for i in range(10):
            b.add(bytes([i]) * 100, (node_addr, 4600))
        b.add(b"z" * 40, (node_addr, 4600))  # shorter last segment
        b.flush()
        rx.settimeout(1)
        got = [rx.recv(2048) for _ in range(11)]
        assert got[:10] == [bytes([i]) * 100 for i in range(10)]
        assert got[10] == b"z" * 40
        assert b.sent == 11 and b.errors == 0
    finally:
        tx.close()
        rx.close()


def test_gso_batcher_zero_copy_slots_and_copies_mix(netns_topology) -> None:
    """Datagrams built in place at ``slot()`` and committed, mixed with
    copies (``add``), two destinations and a short one: each receiver gets
    exactly its datagrams, in order."""
    topo = netns_topology(PREFIX)
    node = topo.namespace("node")
    with tun.in_netns(node.name):
        tx = sockets.open_udp("127.0.0.1", 4500)
        rx_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx_a.bind(("127.0.0.1", 4601))
        rx_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx_b.bind(("127.0.0.1", 4602))
    a, b = ("127.0.0.1", 4601), ("127.0.0.1", 4602)
    try:
        g = sockets.GsoBatcher(tx, max_segments=4, room=2048)
        want: dict[tuple[str, int], list[bytes]] = {a: [], b: []}

        def in_place(data: bytes, dest: tuple[str, int]) -> None:
            at = g.slot()
            g.buf[at : at + len(data)] = data  # what a read + in-place encrypt leaves
            g.commit(len(data), dest)
            want[dest].append(data)

        def copy(data: bytes, dest: tuple[str, int]) -> None:
            g.add(data, dest)
            want[dest].append(data)

        for i in range(6):  # more than max_segments: the full batch goes first
            in_place(bytes([i]) * 200, a)
        in_place(b"B" * 200, b)  # another destination: starts the next batch in place
        copy(b"C" * 200, b)
        in_place(b"D" * 200, b)
        in_place(b"short", b)
        copy(b"E" * 200, a)  # after a short one: a new batch
        g.flush()
        for rx in (rx_a, rx_b):
            rx.settimeout(1)
        got_a = [rx_a.recv(2048) for _ in want[a]]
        got_b = [rx_b.recv(2048) for _ in want[b]]
        assert got_a == want[a] and got_b == want[b]
        assert g.sent == 11 and g.errors == 0
    finally:
        for s in (tx, rx_a, rx_b):
            s.close()


def test_gso_batch_arrives_as_gro_segments_across_veth(netns_topology) -> None:
    """A GSO batch sent over veth reaches a UDP_GRO socket as one read with
    the segment size; the segments split back to exactly what was sent."""
    topo = netns_topology(PREFIX)
    a, b = topo.namespace("gsoa"), topo.namespace("gsob")
    topo.veth(a, "ga", b, "gb", addr_a="172.31.5.1/24", addr_b="172.31.5.2/24")
    with tun.in_netns(a.name):
        tx = sockets.open_udp("172.31.5.1", 4500)
    with tun.in_netns(b.name):
        rx = sockets.open_udp("172.31.5.2", 4500)
    try:
        assert sockets.enable_gro(rx)
        b_ = sockets.GsoBatcher(tx)
        sent = [bytes([i]) * 300 for i in range(8)] + [b"tail"]
        for d in sent:
            b_.add(d, ("172.31.5.2", 4500))
        b_.flush()
        assert _wait_readable([rx.fileno()])
        time.sleep(0.1)
        got: list[bytes] = []
        reads = 0
        buf = bytearray(65536)
        try:
            while True:
                n, anc, _f, _addr = rx.recvmsg_into([buf], sockets.GRO_CMSG_SPACE)
                reads += 1
                seg = sockets.gro_segment_size(anc, n)
                got += [bytes(buf[o : min(o + seg, n)]) for o in range(0, n, seg)]
        except BlockingIOError:
            pass
        assert got == sent
        assert reads < len(sent)  # coalesced: fewer reads than datagrams
    finally:
        tx.close()
        rx.close()
