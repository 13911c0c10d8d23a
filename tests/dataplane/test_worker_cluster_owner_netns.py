"""Replay protection across nodes (DESIGN §5), with real worker processes.

Two nodes (namespaces ``awt-c-<pid>-n1`` with workers n1/0 and n1/1,
``-n2`` with n2/0), each carrying the anycast address, a cluster link
between them (the handoff network), a customer site reachable from both,
and control's real record logic (:class:`control.service.ControlService`
``publish_checkpoints`` / ``publish_workers``) over a real CURVE bus.

* The replay-protected tunnel's inner traffic enters at BOTH nodes; the
  site (our codec with a replay window, scapy for the inner packets) sees
  one sequence space: no number twice, every packet accepted.
* SIGKILL of the owner (n1/0; the SPI is chosen so) moves the SA to its
  sibling n1/1 at once; SIGKILL of n1/1 too moves it to the other node once
  control drops node 1's records: numbers continue above, never repeat.
* Inbound: a captured packet that node 1 accepted, replayed to node 2 and to
  a restarted worker on node 1, is dropped and counted as ``replay``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation

from dataplane import tun
from dataplane.drops import Drop
from dataplane.worker import cluster_id, rendezvous_owner
from replication.records import Direction

from ._worker_records import ACCOUNT_A, route, sa, tunnel

pytestmark = pytest.mark.netns

PREFIX = f"awt-c-{os.getpid()}-"
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
ANYCAST, SITE = "192.0.2.1", "198.51.100.2"
OUT_KEY, OUT_SALT = os.urandom(32), os.urandom(4)
IN_KEY, IN_SALT = os.urandom(32), os.urandom(4)
IN_SPI = 0x1001
WORKERS = [("n1", 0), ("n1", 1), ("n2", 0)]
METRICS_PORT = {("n1", 0): 9461, ("n1", 1): 9462, ("n2", 0): 9463}


def _pick_spi() -> int:
    """An outbound SPI owned by n1/0 while all three live (then by n1/1
    without it: the node comes first, and by n2/0 without node 1)."""
    every = tuple(sorted(cluster_id(n, i) for n, i in WORKERS))
    for spi in range(0x3000, 0x4000):
        if rendezvous_owner(spi, every) == cluster_id("n1", 0):
            return spi
    raise AssertionError("no SPI with the wanted owner")


OUT_SPI = _pick_spi()
T = replace(tunnel(1, local=ANYCAST, remote=SITE), replay_protection=True)
RECORDS = [
    T,
    route(1, "10.2.0.0/24", 1),
    sa(OUT_SPI, Direction.OUT, udp_encap=True, remote=SITE, enc_key=OUT_KEY, salt=OUT_SALT),
    sa(
        IN_SPI,
        Direction.IN,
        udp_encap=True,
        remote=SITE,
        enc_key=IN_KEY,
        salt=IN_SALT,
        replay_window=64,
    ),
]


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, topo: Any, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.procs: dict[tuple[str, int], subprocess.Popen[Any]] = {}
        self.bus_args: list[str] = []
        self.service: Any = None
        self.received: list[bytes] = []
        self.site_sock: socket.socket | None = None
        self._stop = threading.Event()

    def start_worker(self, node: str, index: int) -> None:
        k = node[1:]
        argv = [
            PY, "-m", "dataplane.cli", "--netns", self.topo.namespaces[node].name,
            "--anycast", ANYCAST, "--index", str(index), "--workers", "2", "--node", node,
            "--run-dir", str(self.tmp / f"run-{node}"),
            "--netns-template", f"{PREFIX}{node}-{{account}}",
            "--metrics-addr", "127.0.0.1", "--metrics-port", str(METRICS_PORT[(node, index)]),
            "--listen", "udp4500", "--handoff-addr", f"10.77.0.{k}",
            "--log-level", "WARNING", *self.bus_args,
        ]  # fmt: skip
        log = open(self.tmp / f"worker-{node}-{index}.log", "ab")  # noqa: SIM115
        self.procs[(node, index)] = self.topo.root.popen(argv, stdout=log, stderr=log, cwd=ROOT)

    def kill(self, node: str, index: int) -> None:
        p = self.procs[(node, index)]
        p.kill()
        p.wait(5)

    def metrics(self, node: str, index: int) -> dict[str, float]:
        url = f"http://127.0.0.1:{METRICS_PORT[(node, index)]}/metrics"
        with tun.in_netns(self.topo.namespaces[node].name):
            body = urllib.request.urlopen(url, timeout=3).read().decode()
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith("anywan_") and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, node: str, index: int, name: str) -> float:
        try:
            return self.metrics(node, index).get(name, 0.0)
        except OSError:
            return -1.0

    def diagnosis(self) -> str:
        """Every worker's non-zero drop and handoff counters (for a failure
        message: the module's worker logs are printed only at its teardown)."""
        parts = []
        for node, index in WORKERS:
            try:
                m = self.metrics(node, index)
            except OSError as exc:
                parts.append(f"{node}/{index}: no /metrics ({exc})")
                continue
            got = {
                k.split("{", 1)[1].rstrip("}") if "{" in k else k: v
                for k, v in m.items()
                if v and ("drops_total" in k or "handoff_packets_total" in k)
            }
            parts.append(f"{node}/{index}: {got}")
        return "; ".join(parts)

    def replay_drops(self, node: str, index: int) -> float:
        return self.metric(node, index, 'anywan_worker_drops_total{reason="replay"}')

    def receive_loop(self) -> None:
        sock = self.site_sock
        assert sock is not None
        sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= 8 and data[:4] != b"\0\0\0\0":
                self.received.append(data)

    def inner_send(self, node: str, count: int, port_base: int) -> None:
        """``count`` inner UDP packets from the node's account network toward
        the site's LAN (through the tunnel), from varied ports (so the node's
        TUN queues spread them over its workers)."""
        k = node[1:]
        with tun.in_netns(f"{PREFIX}{node}-{ACCOUNT_A}"):
            for p in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((f"10.1.0.{k}", port_base + p))
                    s.sendto(b"x" * 32, ("10.2.0.9", 9))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from control.config import ControlConfig
    from control.metrics import ControlMetrics
    from control.secrets import MasterKey
    from control.service import ControlService
    from control.store import Store
    from deploy.netns import Namespace, Topology, cleanup_prefix
    from replication import curve
    from replication.publisher import Publisher

    cleanup_prefix(PREFIX)
    tmp = tmp_path_factory.mktemp("awt-c")
    topo = Topology(PREFIX)
    c = Cluster(topo, tmp)
    stop_control = threading.Event()
    threads: list[threading.Thread] = []
    try:
        site = topo.namespace("site")
        site.addr("lo", f"{SITE}/32")
        for k in (1, 2):
            node = topo.namespace(f"n{k}")
            node.addr("lo", f"{ANYCAST}/32")
            topo.veth(node, "s0", site, f"n{k}", addr_a=f"172.30.{k}.1/24",
                      addr_b=f"172.30.{k}.2/24")  # fmt: skip
            node.route(f"{SITE}/32", via=f"172.30.{k}.2")
        site.route(f"{ANYCAST}/32", via="172.30.1.1")
        topo.veth(topo.namespaces["n1"], "c0", topo.namespaces["n2"], "c0",
                  addr_a="10.77.0.1/30", addr_b="10.77.0.2/30")  # fmt: skip

        keydir = tmp / "keys"
        keydir.mkdir()
        curve.generate_keypair(keydir, "control")
        curve.generate_keypair(keydir, "worker")
        srv_pub, srv_sec = curve.load_secret(keydir / "control.key")
        wrk_pub, _ = curve.load_secret(keydir / "worker.key")
        eps = [f"ipc://{tmp}/{n}.sock" for n in ("snap", "upd", "ack")]

        def make_publisher(initial: list[Any]) -> Publisher:
            return Publisher(
                snapshot_endpoint=eps[0], update_endpoint=eps[1], ack_endpoint=eps[2],
                server_public=srv_pub, server_secret=srv_sec, allowed_clients=[wrk_pub],
                heartbeat_interval=0.2, initial=initial,
            )  # fmt: skip

        state = tmp / "control"
        state.mkdir()
        store = Store.open(state, MasterKey.load_or_create(state / "master.key"))
        c.service = ControlService(
            ControlConfig(state_dir=state, api_listen="127.0.0.1:0"),
            store,
            make_publisher,
            metrics=ControlMetrics(),
        )
        c.service.publisher.start()
        for rec in RECORDS:
            c.service.publisher.set(rec)

        def control_loop() -> None:  # what ControlService._checkpoint_loop does, faster
            while not stop_control.wait(0.3):
                c.service.publish_checkpoints()
                c.service.publish_workers()

        threads.append(threading.Thread(target=control_loop, daemon=True))
        c.bus_args = [
            "--bus-snapshot", eps[0], "--bus-updates", eps[1], "--bus-acks", eps[2],
            "--bus-server-key", str(keydir / "control.pub"),
            "--bus-client-key", str(keydir / "worker.key"),
        ]  # fmt: skip
        with tun.in_netns(site.name):
            c.site_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.site_sock.bind((SITE, 4500))
        threads.append(threading.Thread(target=c.receive_loop, daemon=True))
        for t in threads:
            t.start()
        for node, index in WORKERS:
            c.start_worker(node, index)
        for node in ("n1", "n2"):
            name = f"{PREFIX}{node}-{ACCOUNT_A}"
            _wait(lambda n=name: tun.device_exists("aw0", netns_name=n), 20, f"{name} TUN")
            acct = Namespace(topo, name)
            topo.namespaces[f"acct-{node}"] = acct  # removed with the topology
            acct.addr("lo", f"10.1.0.{node[1:]}/32")
        _wait(
            lambda: sum(k.startswith("worker/") for k in c.service.publisher.items()) == 3,
            15,
            "three worker records",
        )
        _wait(
            lambda: all(
                c.metric(n, i, 'anywan_worker_owner_election_members{scope="cluster"}') == 3
                for n, i in WORKERS
            ),
            10,
            "every worker electing over the three records",
        )
        yield c
    finally:
        stop_control.set()
        c._stop.set()
        for p in c.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for t in threads:
            t.join(2)
        if c.site_sock is not None:
            c.site_sock.close()
        if c.service is not None:
            with contextlib.suppress(Exception):
                c.service.publisher.stop()
            with contextlib.suppress(Exception):
                c.service.store.close()
        topo.close()
        cleanup_prefix(PREFIX)
        for p in sorted(tmp.glob("*.log")):
            text = p.read_text(errors="replace")[-2000:]
            if text.strip():
                print(f"---- {p.name}\n{text}")


def _decode_all(packets: list[bytes]) -> tuple[list[int], set[str]]:
    """The site's receiver: our inbound codec with a 128-packet replay
    window (raises on any replay or bad ICV), scapy for the inner source."""
    from dataplane.esp import InboundSa

    rx = InboundSa.from_record(
        sa(OUT_SPI, Direction.IN, enc_key=OUT_KEY, salt=OUT_SALT, replay_window=128)
    )
    scapy_sa = SecurityAssociation(
        ESP, spi=OUT_SPI, crypt_algo="AES-GCM", crypt_key=OUT_KEY + OUT_SALT, crypt_icv_size=16
    )
    seqs, sources = [], set()
    for data in packets:
        try:
            rx.decapsulate(data)
        except Drop as exc:
            raise AssertionError(f"site receiver refused seq {ESP(data).seq}: {exc}") from None
        seqs.append(ESP(data).seq)
        plain = scapy_sa.decrypt(IP(src=ANYCAST, dst=SITE) / ESP(data))
        inner = plain.getlayer(IP, 2)  # under the outer header scapy keeps
        sources.add(inner.src if inner is not None else "?")
    return seqs, sources


def _traffic_until(c: Cluster, nodes: tuple[str, ...], want: int, port: int) -> list[int]:
    """Inner packets from ``nodes`` (2 each per 0.2 s) until the site got
    ``want`` more from each of them (at most 15 s); their ESP sequence
    numbers in arrival order."""
    mid = len(c.received)
    wanted = {f"10.1.0.{n[1:]}" for n in nodes}
    end = time.monotonic() + 15
    r = 0
    while time.monotonic() < end:
        for n in nodes:
            c.inner_send(n, 2, port + 2 * r)
        r += 1
        time.sleep(0.2)
        if len(c.received) - mid >= want * len(nodes):
            _, srcs = _decode_all(c.received[mid:])
            if srcs == wanted:
                break
    seqs, srcs = _decode_all(c.received[mid:])
    assert srcs == wanted, (len(seqs), srcs)
    return seqs


def test_one_sequence_space_across_nodes_and_owner_sigkill(cluster: Cluster) -> None:
    c = cluster
    start = len(c.received)
    for r in range(3):
        c.inner_send("n1", 10, 20000 + 100 * r)
        c.inner_send("n2", 10, 21000 + 100 * r)
    try:
        _wait(lambda: len(c.received) >= start + 60, 10, "60 ESP packets at the site")
    except AssertionError as exc:  # seen once in CI: say where the packets went
        got = len(c.received) - start
        raise AssertionError(f"{exc} (got {got}); {c.diagnosis()}") from None
    before, sources = _decode_all(c.received[start:])
    assert len(set(before)) == len(before) == 60
    assert sources == {"10.1.0.1", "10.1.0.2"}  # both nodes' traffic, one SA, one space
    # n2/0 handed its share across to node 1 (UDP, authenticated), which sent it
    remote = 'anywan_worker_replay_remote_handoff_packets_total{result="%s"}'
    _wait(lambda: c.metric("n2", 0, remote % "sent") >= 30, 3, "n2/0's handoffs in /metrics")
    _wait(
        lambda: sum(c.metric("n1", i, remote % "received") for i in (0, 1)) >= 30,
        3,
        "node 1 counting them",
    )
    assert sum(c.metric("n1", i, remote % "rejected") for i in (0, 1)) == 0

    # SIGKILL the owner: its sibling on node 1 takes the SA at once.
    c.kill("n1", 0)
    after = _traffic_until(c, ("n1", "n2"), 10, 23000)
    assert min(after) > max(before)
    assert "worker/n1/1" in c.service.publisher.items()  # no cross-node move needed

    # Node 1 goes entirely: once control drops its records, n2/0 owns the SA
    # and starts above node 1's replicated reservation.
    c.kill("n1", 1)
    _wait(
        lambda: not any(k.startswith("worker/n1/") for k in c.service.publisher.items()),
        5,
        "control dropping node 1's records",
    )
    last = _traffic_until(c, ("n2",), 10, 25000)
    assert min(last) > max(after)
    everything, _ = _decode_all(c.received[start:])  # one receiver, one window: all accepted
    assert len(set(everything)) == len(everything)


def _inbound(seq: int) -> bytes:
    sa_ = SecurityAssociation(
        ESP, spi=IN_SPI, crypt_algo="AES-GCM", crypt_key=IN_KEY + IN_SALT, crypt_icv_size=16,
        seq_num=seq,
    )  # fmt: skip
    inner = IP(src="10.2.0.9", dst="10.1.0.1") / UDP(sport=9, dport=9) / b"in"
    return bytes(sa_.encrypt(inner)[ESP])


def _via(c: Cluster, node: str) -> None:
    k = node[1:]
    c.topo.namespaces["site"].route(f"{ANYCAST}/32", via=f"172.30.{k}.1", replace=True)


def test_inbound_replay_refused_on_another_node_and_after_restart(cluster: Cluster) -> None:
    c = cluster
    sock = c.site_sock
    assert sock is not None
    captured = {s: _inbound(s) for s in range(1, 23)}
    if c.procs[("n1", 0)].poll() is not None:  # the first test stopped node 1
        c.start_worker("n1", 0)
    _wait(lambda: c.metric("n1", 0, "anywan_worker_sas") >= 2, 15, "n1/0 (re)started")
    live_n1 = [i for i in (0, 1) if c.procs[("n1", i)].poll() is None]
    n1_replays = sum(c.replay_drops("n1", i) for i in live_n1)
    _via(c, "n1")
    for s in range(1, 21):
        sock.sendto(captured[s], (ANYCAST, 4500))
    key = f"rwin/{IN_SPI:08x}"
    _wait(lambda: getattr(c.service.publisher.items().get(key), "top", 0) == 20, 5, "rwin 20")
    assert sum(c.replay_drops("n1", i) for i in live_n1) == n1_replays  # all were new

    # The traffic moves to node 2: its worker refuses what node 1 accepted.
    _via(c, "n2")
    n2_before = c.replay_drops("n2", 0)
    sock.sendto(captured[7], (ANYCAST, 4500))
    sock.sendto(captured[20], (ANYCAST, 4500))
    _wait(lambda: c.replay_drops("n2", 0) == n2_before + 2, 5, "two replay drops on n2/0")
    sock.sendto(captured[21], (ANYCAST, 4500))  # a new packet passes
    _wait(lambda: getattr(c.service.publisher.items().get(key), "top", 0) == 21, 5, "rwin 21")
    assert c.replay_drops("n2", 0) == n2_before + 2

    # A restarted worker (alone on node 1) starts from the checkpoint.
    for i in (0, 1):
        if c.procs[("n1", i)].poll() is None:
            c.kill("n1", i)
    c.start_worker("n1", 0)
    raised = "anywan_worker_replay_windows_raised_total"
    _wait(lambda: c.metric("n1", 0, raised) >= 1, 15, "the restarted worker's window raised")
    _via(c, "n1")
    restarted = c.replay_drops("n1", 0)
    sock.sendto(captured[21], (ANYCAST, 4500))
    _wait(lambda: c.replay_drops("n1", 0) == restarted + 1, 5, "replay drop on restarted n1/0")
    sock.sendto(captured[22], (ANYCAST, 4500))
    time.sleep(0.3)
    assert c.replay_drops("n1", 0) == restarted + 1
