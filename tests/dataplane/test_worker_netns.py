"""End to end: scapy customer sites ↔ anywan-worker (real bus) ↔ an inner host.

Topology (all namespaces ours, prefix ``awt-x-e2e-``)::

  site-esp  (172.31.1.2) ─┐                          ┌ acct-a (created by the worker,
  site-udp  (172.31.2.2) ─┼─ node: anycast 192.0.2.1 │  TUN aw0) ── host 10.1.0.2
  site-gre  (172.31.3.2) ─┘   worker(s) ─────────────┤            fd00:1::2
                                                      └ acct-b (TUN aw0, other account)

The sites are ``_scapy_peer.py`` processes: ESP (AES-256-GCM), ESP-in-UDP
(AES-CBC-256 + HMAC-SHA-256-128) and GRE, each behind its own TUN. Records go
through the real bus: a :class:`replication.publisher.Publisher` in this
process, the workers subscribe over CURVE on ipc:// endpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane import tun
from replication.records import Cipher, Direction, TrafficSelector, TunnelKind

from ._worker_netns_names import sweep_dead, unique_prefix
from ._worker_records import ACCOUNT_A, ACCOUNT_B, route, sa, tid, tunnel

pytestmark = pytest.mark.netns

PREFIX = unique_prefix("e2e")
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
ANYCAST = "192.0.2.1"
SITES = {"esp": "172.31.1.2", "udp": "172.31.2.2", "gre": "172.31.3.2"}
GCM_KEY_IN, GCM_SALT_IN = os.urandom(32), os.urandom(4)
GCM_KEY_OUT, GCM_SALT_OUT = os.urandom(32), os.urandom(4)
CBC_KEY_IN, CBC_IKEY_IN = os.urandom(32), os.urandom(32)
CBC_KEY_OUT, CBC_IKEY_OUT = os.urandom(32), os.urandom(32)
REPLAY_KEY, REPLAY_SALT = os.urandom(32), os.urandom(4)
NARROW_KEY, NARROW_SALT = os.urandom(32), os.urandom(4)
SEQ_LOG = Path(f"/tmp/awt-x-e2e-seq-{os.getpid()}.log")


def records() -> list[Any]:
    a = ACCOUNT_A
    out: list[Any] = [
        tunnel(1, account=a, local=ANYCAST, remote=SITES["esp"], iface="10.100.0.0/31"),
        tunnel(2, account=a, local=ANYCAST, remote=SITES["udp"], iface="10.100.0.2/31"),
        tunnel(
            3,
            account=a,
            kind=TunnelKind.GRE,
            local=ANYCAST,
            remote=SITES["gre"],
            iface="fd00:100::/127",
        ),
        route(1, "10.2.0.0/24", 1, account=a),
        route(2, "fd00:2::/64", 1, account=a),
        route(3, "10.3.0.0/24", 2, account=a),
        route(4, "10.4.0.0/24", 3, account=a),
        route(5, "fd00:4::/64", 3, account=a),
        # account B: same inner prefix as A's site, plus one only B routes
        tunnel(
            9,
            account=ACCOUNT_B,
            kind=TunnelKind.GRE,
            local=ANYCAST,
            remote="172.31.9.9",
            iface="10.100.0.0/31",
        ),
        route(9, "10.2.0.0/24", 9, account=ACCOUNT_B),
        route(10, "10.50.0.0/24", 9, account=ACCOUNT_B),
        # ESP site: AES-256-GCM both ways
        sa(
            0x1001,
            Direction.IN,
            tunnel_n=1,
            local=ANYCAST,
            remote=SITES["esp"],
            enc_key=GCM_KEY_IN,
            salt=GCM_SALT_IN,
        ),
        sa(
            0x2001,
            Direction.OUT,
            tunnel_n=1,
            local=ANYCAST,
            remote=SITES["esp"],
            enc_key=GCM_KEY_OUT,
            salt=GCM_SALT_OUT,
        ),
        # UDP site: AES-CBC-256 + HMAC-SHA-256-128 in UDP 4500
        sa(
            0x1002,
            Direction.IN,
            tunnel_n=2,
            local=ANYCAST,
            remote=SITES["udp"],
            cipher=Cipher.AES256CBC,
            enc_key=CBC_KEY_IN,
            integ_key=CBC_IKEY_IN,
            udp_encap=True,
        ),
        sa(
            0x2002,
            Direction.OUT,
            tunnel_n=2,
            local=ANYCAST,
            remote=SITES["udp"],
            cipher=Cipher.AES256CBC,
            enc_key=CBC_KEY_OUT,
            integ_key=CBC_IKEY_OUT,
            udp_encap=True,
        ),
        # extra inbound SAs on tunnel 1 for the drop tests
        sa(
            0x1003,
            Direction.IN,
            tunnel_n=1,
            local=ANYCAST,
            remote=SITES["esp"],
            enc_key=REPLAY_KEY,
            salt=REPLAY_SALT,
            replay_window=64,
            child_id=3,
        ),
        sa(
            0x1004,
            Direction.IN,
            tunnel_n=1,
            local=ANYCAST,
            remote=SITES["esp"],
            enc_key=NARROW_KEY,
            salt=NARROW_SALT,
            child_id=4,
            ts_remote=(TrafficSelector.from_network("10.2.0.0/24"),),
        ),
    ]
    return out


class Lab:
    def __init__(self, topo: Any, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.workers: dict[int, subprocess.Popen[Any]] = {}
        self.sites: dict[str, subprocess.Popen[Any]] = {}
        self.publisher: Any = None
        self.relay: Any = None
        self.relayed: list[Any] = []
        self.bus_args: list[str] = []

    def ns(self, name: str) -> Any:
        return self.topo.namespaces[name]

    def start_worker(self, index: int) -> subprocess.Popen[Any]:
        argv = [
            PY, "-m", "dataplane.cli", "--netns", self.ns("node").name, "--anycast", ANYCAST,
            "--index", str(index), "--workers", "2", "--node", "n1",
            "--run-dir", str(self.tmp / "run"), "--netns-template", PREFIX + "{account}",
            "--metrics-addr", "127.0.0.1", "--metrics-port", str(9410 + index),
            "--log-level", "WARNING", *self.bus_args,
        ]  # fmt: skip
        log = open(self.tmp / f"worker{index}.log", "ab")  # noqa: SIM115
        proc = self.topo.root.popen(argv, stdout=log, stderr=log, cwd=ROOT)
        self.workers[index] = proc
        return proc

    def metrics(self, index: int = 0) -> dict[str, float]:
        with tun.in_netns(self.ns("node").name):
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{9410 + index}/metrics", timeout=3)
                .read()
                .decode()
            )
        out: dict[str, float] = {}
        for line in body.splitlines():
            if line.startswith(("anywan_worker", "anywan_bus")) and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def drops(self, reason: str, index: int = 0) -> float:
        return self.metrics(index).get(f'anywan_worker_drops_total{{reason="{reason}"}}', 0.0)


def _site_args(kind: str) -> list[str]:
    common = ["--local", SITES[kind], "--remote", ANYCAST, "--tun", "st0", "--duration", "170"]
    if kind == "esp":
        return [
            "--mode", "esp", *common, "--addr", "10.2.0.1/24", "--addr", "fd00:2::1/64",
            "--route", "10.1.0.0/24", "--route", "fd00:1::/64", "--cipher", "gcm",
            "--spi-out", "0x1001", "--key-out", GCM_KEY_IN.hex(), "--salt-out", GCM_SALT_IN.hex(),
            "--spi-in", "0x2001", "--key-in", GCM_KEY_OUT.hex(), "--salt-in", GCM_SALT_OUT.hex(),
            "--seq-log", str(SEQ_LOG),
        ]  # fmt: skip
    if kind == "udp":
        return [
            "--mode", "udp", *common, "--addr", "10.3.0.1/24", "--route", "10.1.0.0/24",
            "--cipher", "cbc", "--spi-out", "0x1002", "--key-out", CBC_KEY_IN.hex(),
            "--ikey-out", CBC_IKEY_IN.hex(), "--spi-in", "0x2002", "--key-in", CBC_KEY_OUT.hex(),
            "--ikey-in", CBC_IKEY_OUT.hex(),
        ]  # fmt: skip
    return [
        "--mode", "gre", *common, "--addr", "10.4.0.1/24", "--addr", "fd00:4::1/64",
        "--route", "10.1.0.0/24", "--route", "fd00:1::/64",
    ]  # fmt: skip


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from deploy.netns import Namespace, Topology, cleanup_prefix
    from replication import curve
    from replication.publisher import Publisher

    sweep_dead("e2e")
    cleanup_prefix(PREFIX)
    tmp = tmp_path_factory.mktemp("awt-x-e2e")
    topo = Topology(PREFIX)
    lab = Lab(topo, tmp)
    try:
        node = topo.namespace("node")
        node.addr("lo", f"{ANYCAST}/32")
        for i, kind in enumerate(("esp", "udp", "gre"), start=1):
            site = topo.namespace(f"site-{kind}")
            topo.veth(site, "w0", node, f"s{i}", addr_a=f"172.31.{i}.2/24",
                      addr_b=f"172.31.{i}.1/24")  # fmt: skip
            site.route(f"{ANYCAST}/32", via=f"172.31.{i}.1")
        host = topo.namespace("host")

        keydir = tmp / "keys"
        keydir.mkdir()
        curve.generate_keypair(keydir, "control")
        curve.generate_keypair(keydir, "worker")
        srv_pub, srv_sec = curve.load_secret(keydir / "control.key")
        wrk_pub, _ = curve.load_secret(keydir / "worker.key")
        eps = [f"ipc://{tmp}/{n}.sock" for n in ("snap", "upd", "ack")]
        lab.publisher = Publisher(
            snapshot_endpoint=eps[0], update_endpoint=eps[1], ack_endpoint=eps[2],
            server_public=srv_pub, server_secret=srv_sec, allowed_clients=[wrk_pub],
            heartbeat_interval=0.2,
        )  # fmt: skip
        lab.publisher.start()
        for rec in records():
            lab.publisher.set(rec)
        from replication.relay import IkeDatagram, RelayServer

        lab.relay = RelayServer(
            endpoint=f"ipc://{tmp}/relay.sock", server_public=srv_pub, server_secret=srv_sec,
            allowed_clients=[wrk_pub],
        )  # fmt: skip

        def on_ike(d: Any) -> None:  # control's side: answer every datagram
            lab.relayed.append(d)
            lab.relay.send(
                IkeDatagram(
                    worker_id=d.worker_id, data=b"reply:" + d.data, local_addr=d.local_addr,
                    local_port=d.local_port, remote_addr=d.remote_addr,
                    remote_port=d.remote_port,
                )
            )  # fmt: skip

        lab.relay.on_datagram = on_ike
        lab.relay.start()
        lab.bus_args = ["--relay-endpoint", f"ipc://{tmp}/relay.sock",
            "--bus-snapshot", eps[0], "--bus-updates", eps[1], "--bus-acks", eps[2],
            "--bus-server-key", str(keydir / "control.pub"),
            "--bus-client-key", str(keydir / "worker.key"),
        ]  # fmt: skip
        lab.start_worker(0)
        acct_a_name = PREFIX + ACCOUNT_A
        _wait(
            lambda: (
                tun.device_exists("aw0", netns_name=acct_a_name)
                and tun.device_exists("aw0", netns_name=PREFIX + ACCOUNT_B)
            ),
            15,
            "the worker to create both accounts' TUNs",
        )
        acct = Namespace(topo, acct_a_name)
        topo.namespaces["acct-a"] = acct  # so the topology removes it
        topo.namespaces["acct-b"] = Namespace(topo, PREFIX + ACCOUNT_B)
        for ns in (acct, host):  # no DAD: addresses usable at once (no tentative source)
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
            ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        topo.veth(acct, "h0", host, "h0", addr_a=["10.1.0.1/24", "fd00:1::1/64"],
                  addr_b=["10.1.0.2/24", "fd00:1::2/64"])  # fmt: skip
        acct.enable_forwarding()
        host.route("default", via="10.1.0.1")
        host.route("::/0", via="fd00:1::1")
        for kind in ("esp", "udp", "gre"):
            log = open(tmp / f"site-{kind}.log", "ab")  # noqa: SIM115
            lab.sites[kind] = topo.namespace(f"site-{kind}").popen(
                [PY, str(ROOT / "tests/dataplane/_scapy_peer.py"), *_site_args(kind)],
                stdout=log, stderr=log, cwd=ROOT,
            )  # fmt: skip
        _wait(
            lambda: all(
                tun.device_exists("st0", netns_name=topo.namespaces[f"site-{k}"].name)
                for k in SITES
            ),
            20,
            "the scapy sites",
        )
        time.sleep(1.0)  # routes on the site TUNs
        yield lab
    finally:
        for thing in (lab.publisher, lab.relay):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()
        topo.close()
        cleanup_prefix(PREFIX)
        SEQ_LOG.unlink(missing_ok=True)
        for p in sorted(tmp.glob("*.log")):
            text = p.read_text(errors="replace")[-3000:]
            if text.strip():
                print(f"---- {p.name}\n{text}")


def ping(
    lab: Lab, ns: str, dst: str, *, count: int = 3, extra: tuple[str, ...] = (), deadline: int = 8
) -> str:
    """``count`` pings; waits for all replies up to ``deadline`` s (the scapy
    sites are slow, so ping's default "two RTTs" for the last reply is not enough)."""
    res = lab.ns(ns).run(
        ["ping", "-c", str(count), "-i", "0.2", "-w", str(deadline), *extra, dst],
        check=False,
        timeout=deadline + 10,
    )
    return f"{res.stdout}{res.stderr}[rc={res.returncode}]"


def _received(out: str) -> int:
    m = re.search(r"(\d+) received", out)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dst", ["10.2.0.1", "fd00:2::1", "10.3.0.1", "10.4.0.1", "fd00:4::1"],
    ids=["esp-v4", "esp-v6", "udp-v4", "gre-v4", "gre-v6"],
)  # fmt: skip
def test_ping_from_inner_host_through_each_tunnel(lab: Lab, dst: str) -> None:
    out = ping(lab, "host", dst)
    assert _received(out) == 3, out


@pytest.mark.parametrize(
    ("site", "src"), [("esp", "10.2.0.1"), ("udp", "10.3.0.1"), ("gre", "10.4.0.1")]
)
def test_ping_from_site_to_inner_host(lab: Lab, site: str, src: str) -> None:
    out = ping(lab, f"site-{site}", "10.1.0.2", extra=("-I", src))
    assert _received(out) == 3, out


SERVER = r"""
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
if sys.argv[3] == 'tcp':
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(15)
    c, _ = s.accept(); c.settimeout(10); data = b''
    while not data.endswith(b'END'):
        chunk = c.recv(65536)
        if not chunk: break
        data += chunk
    c.sendall(b'ECHO' + str(len(data)).encode()); c.close()
else:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(15)
    data, addr = s.recvfrom(65536); s.sendto(b'ECHO' + str(len(data)).encode(), addr)
"""
CLIENT = r"""
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
payload = b'x' * int(sys.argv[4]) + b'END'
for attempt in range(20):
    try:
        if sys.argv[3] == 'tcp':
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
            s.sendall(payload); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode()); break
        else:
            s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2)
            s.sendto(payload, (sys.argv[1], int(sys.argv[2]))); print(s.recv(100).decode()); break
    except (ConnectionRefusedError, socket.timeout):
        import time; time.sleep(0.2)
"""


def _exchange(lab: Lab, server_ns: str, client_ns: str, addr: str, proto: str, size: int) -> str:
    port = 7000 + (hash((server_ns, addr, proto)) % 1000)
    srv = lab.ns(server_ns).popen(
        [PY, "-c", SERVER, addr, str(port), proto], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.3)
        res = lab.ns(client_ns).run([PY, "-c", CLIENT, addr, str(port), proto, str(size)],
                                    check=False, timeout=40)  # fmt: skip
        return res.stdout.strip() or res.stderr[-500:]
    finally:
        lab.topo.stop(srv, grace=0.5)


@pytest.mark.parametrize(
    ("server", "client", "addr", "proto", "size"),
    [
        ("site-esp", "host", "10.2.0.1", "tcp", 200_000),   # host → site, MSS-clamped TCP
        ("host", "site-esp", "10.1.0.2", "tcp", 50_000),    # site → host
        ("site-esp", "host", "fd00:2::1", "tcp", 50_000),   # IPv6 inner
        ("host", "site-udp", "10.1.0.2", "tcp", 50_000),    # ESP-in-UDP
        ("site-gre", "host", "10.4.0.1", "tcp", 50_000),    # GRE
        ("site-esp", "host", "10.2.0.1", "udp", 1000),
        ("host", "site-gre", "fd00:1::2", "udp", 1000),
        ("site-udp", "host", "10.3.0.1", "udp", 3000),     # fragmented inner (no DF)
    ],
)  # fmt: skip
def test_tcp_and_udp_both_directions(
    lab: Lab, server: str, client: str, addr: str, proto: str, size: int
) -> None:
    assert _exchange(lab, server, client, addr, proto, size) == f"ECHO{size + 3}"


def tunnel_packets(m: dict[str, float], tunnel_id: str, direction: str) -> float:
    total = 0.0
    for k, v in m.items():
        if (
            k.startswith("anywan_worker_tunnel_packets_total{")
            and f'tunnel="{tunnel_id}"' in k
            and f'direction="{direction}"' in k
        ):
            total += v
    return total


def test_packets_counted_per_tunnel(lab: Lab) -> None:
    before = lab.metrics()
    assert _received(ping(lab, "host", "10.2.0.1", count=2)) == 2
    t1 = tid(1)

    def grew() -> bool:
        m = lab.metrics()
        return all(
            tunnel_packets(m, t1, d) >= tunnel_packets(before, t1, d) + 2 for d in ("in", "out")
        )

    _wait(grew, 3, "tunnel counters")
    m = lab.metrics()
    # bus health on the same endpoint: applied sequence, lag, SA count
    assert m["anywan_bus_applied_sequence"] >= len(records())
    assert m["anywan_bus_lag_sequences"] == 0
    assert m["anywan_worker_sas"] == sum(1 for r in records() if r.key.startswith("sa/"))


def test_sa_counters_reported_to_control_over_the_bus(lab: Lab) -> None:
    """The worker reports per-SA packets/bytes with its acks; control's
    publisher holds them (what ``/sas`` sums). Compared with the worker's own
    per-tunnel metric (the ESP tunnel has one SA per direction)."""
    from control.service import sum_sa_counters

    t1 = tid(1)
    assert _received(ping(lab, "host", "10.2.0.1", count=3)) == 3

    def reported() -> dict[tuple[str, int], list[int]]:
        return sum_sa_counters(lab.publisher.reports().values())

    def caught_up() -> bool:
        m, c = lab.metrics(), reported()
        return (
            c.get(("", 0x1001), [0])[0] == tunnel_packets(m, t1, "in") >= 3
            and c.get((t1, 0x2001), [0])[0] == tunnel_packets(m, t1, "out") >= 3
        )

    try:
        _wait(caught_up, 5, "reported SA counters")
    except AssertionError:
        m = lab.metrics()
        got = (tunnel_packets(m, t1, "in"), tunnel_packets(m, t1, "out"), reported())
        raise AssertionError(f"metrics in/out vs reports: {got}") from None
    c = reported()
    # ICMP echo of 84 inner bytes (IPv4) at least; bytes are inner bytes.
    assert c[("", 0x1001)][1] >= 84 * 3 and c[(t1, 0x2001)][1] >= 84 * 3


# ---- drops: each reason provoked and seen in /metrics -----------------------


def _send_esp_from_site(lab: Lab, payloads: list[bytes], *, udp: bool = False) -> None:
    with tun.in_netns(lab.ns("site-esp").name):
        if udp:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((SITES["esp"], 4501))
            for p in payloads:
                s.sendto(p, (ANYCAST, 4500))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
            for p in payloads:
                s.sendto(p, (ANYCAST, 0))
        s.close()


def _scapy_esp(spi: int, key: bytes, salt: bytes, inner: Any, seq: int = 1) -> bytes:
    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    sa_ = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=key + salt,
                              crypt_icv_size=16, seq_num=seq,
                              tunnel_header=IP(src=SITES["esp"], dst=ANYCAST))  # fmt: skip
    return bytes(sa_.encrypt(inner)[ESP])


def _icmp(src: str, dst: str) -> Any:
    from scapy.layers.inet import ICMP, IP

    return IP(src=src, dst=dst) / ICMP(id=77, seq=1) / (b"probe" * 4)


def _provoke(lab: Lab, reason: str, action: Any) -> None:
    before = lab.drops(reason)
    action()
    _wait(lambda: lab.drops(reason) > before, 4, f"drop reason {reason} in /metrics")


def test_drop_bad_icv(lab: Lab) -> None:
    good = bytearray(_scapy_esp(0x1001, GCM_KEY_IN, GCM_SALT_IN, _icmp("10.2.0.1", "10.1.0.2")))
    good[-1] ^= 0x01
    _provoke(lab, "bad_icv", lambda: _send_esp_from_site(lab, [bytes(good)]))


def test_drop_replay_on_replay_protected_sa(lab: Lab) -> None:
    pkt = _scapy_esp(0x1003, REPLAY_KEY, REPLAY_SALT, _icmp("10.2.0.1", "10.1.0.2"), seq=5)
    _provoke(lab, "replay", lambda: _send_esp_from_site(lab, [pkt, pkt]))


def test_replay_is_not_checked_when_off(lab: Lab) -> None:
    pkt = _scapy_esp(0x1001, GCM_KEY_IN, GCM_SALT_IN, _icmp("10.2.0.1", "10.1.0.2"), seq=9)
    before = lab.drops("replay")
    _send_esp_from_site(lab, [pkt, pkt])
    time.sleep(1.2)
    assert lab.drops("replay") == before


def test_drop_unknown_spi(lab: Lab) -> None:
    pkt = _scapy_esp(0xDEAD, GCM_KEY_IN, GCM_SALT_IN, _icmp("10.2.0.1", "10.1.0.2"))
    _provoke(lab, "unknown_spi", lambda: _send_esp_from_site(lab, [pkt]))


def test_drop_selector_mismatch(lab: Lab) -> None:
    pkt = _scapy_esp(0x1004, NARROW_KEY, NARROW_SALT, _icmp("10.9.9.9", "10.1.0.2"))
    _provoke(lab, "selector", lambda: _send_esp_from_site(lab, [pkt]))


def test_drop_malformed(lab: Lab) -> None:
    _provoke(lab, "malformed", lambda: _send_esp_from_site(lab, [b"\x00\x00\x10\x01\x00"]))


def test_drop_keepalive_on_udp_4500(lab: Lab) -> None:
    _provoke(lab, "keepalive", lambda: _send_esp_from_site(lab, [b"\xff"], udp=True))


def test_drop_cross_account(lab: Lab) -> None:
    # A's SPI, inner destination only account B routes
    pkt = _scapy_esp(0x1001, GCM_KEY_IN, GCM_SALT_IN, _icmp("10.2.0.1", "10.50.0.5"))
    _provoke(lab, "cross_account", lambda: _send_esp_from_site(lab, [pkt]))


def test_drop_no_route(lab: Lab) -> None:
    acct = lab.ns("acct-a")
    acct.route("10.77.0.0/24", dev="aw0", replace=True)
    _provoke(lab, "no_route", lambda: ping(lab, "host", "10.77.0.1", count=1, deadline=1))


def test_drop_mtu_sends_frag_needed_back(lab: Lab) -> None:
    holder: dict[str, str] = {}

    def act() -> None:
        holder["out"] = ping(
            lab, "host", "10.2.0.1", count=1, extra=("-M", "do", "-s", "1450"), deadline=2
        )

    _provoke(lab, "mtu", act)
    # the host learned the tunnel MTU (1400) from our ICMP frag-needed
    out = holder["out"] + ping(
        lab, "host", "10.2.0.1", count=1, extra=("-M", "do", "-s", "1450"), deadline=2
    )
    assert "mtu = 1400" in out or "mtu=1400" in out, out
    # and without DF it is fragmented before encapsulation and gets through
    assert _received(ping(lab, "host", "10.2.0.1", count=2, extra=("-M", "dont", "-s", "1450")))


def test_account_b_network_never_sees_account_a_traffic(lab: Lab) -> None:
    """Both accounts route 10.2.0.0/24; A's pings must not reach B's TUN."""
    b = lab.ns("acct-b")
    cap = b.popen(
        ["tcpdump", "-n", "-i", "aw0", "-c", "1", "-w", str(lab.tmp / "b.pcap")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        assert _received(ping(lab, "host", "10.2.0.1", count=3)) == 3
    finally:
        lab.topo.stop(cap, grace=0.5)
    data = (lab.tmp / "b.pcap").read_bytes() if (lab.tmp / "b.pcap").exists() else b""
    assert len(data) <= 24, "a packet appeared on account B's TUN"  # pcap header only


# ---- outer IP header: GRE TTL from the record, ECN copied (RFC 6040) ------------


def _send_udp_from_host(lab: Lab, dst: str, toses: list[int], port: int = 9) -> None:
    """One UDP datagram per TOS / traffic class byte, in order, from the inner host."""
    v6 = ":" in dst
    with tun.in_netns(lab.ns("host").name):
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for tos in toses:
            if v6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
            else:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            s.sendto(b"outer-header-probe", (dst, port))
    finally:
        s.close()


def _outer_headers(
    lab: Lab, site: str, proto: int, send: Any, done: Any, timeout: float = 5.0
) -> list[bytes]:
    """IPv4 headers (+ 8 octets) of the packets from the anycast address that
    a raw ``proto`` socket in ``site`` sees while ``send()`` is repeated,
    until ``done(headers)`` or ``timeout``: the kernel's view of what the
    worker put on the wire."""
    with tun.in_netns(lab.ns(site).name):
        cap = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    cap.settimeout(0.05)
    anycast = socket.inet_aton(ANYCAST)
    got: list[bytes] = []
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and not done(got):
            send()
            turn = time.monotonic() + 0.4
            while time.monotonic() < turn:
                try:
                    data = cap.recv(65535)
                except TimeoutError:
                    continue
                udp4500 = data[20:22] == (4500).to_bytes(2, "big")
                if data[12:16] == anycast and (proto != socket.IPPROTO_UDP or udp4500):
                    got.append(data[:28])
    finally:
        cap.close()
    return got


def test_gre_outer_ttl_is_the_tunnels_ttl(lab: Lab) -> None:
    """TunnelRecord.ttl is the outer TTL of the tunnel's GRE packets; the
    kernel default (64) only when the record says 64."""
    from dataclasses import replace

    t3 = next(r for r in records() if r.key == tunnel(3).key)
    assert t3.ttl == 64
    lab.publisher.set(replace(t3, ttl=37))
    try:
        got = _outer_headers(
            lab, "site-gre", 47, lambda: _send_udp_from_host(lab, "10.4.0.1", [0]),
            lambda g: any(h[8] == 37 for h in g),
        )  # fmt: skip
        assert got and got[-1][8] == 37, [h[8] for h in got]
    finally:
        lab.publisher.set(t3)
    got = _outer_headers(
        lab, "site-gre", 47, lambda: _send_udp_from_host(lab, "10.4.0.1", [0]),
        lambda g: any(h[8] == 64 for h in g),
    )  # fmt: skip
    assert got and got[-1][8] == 64, [h[8] for h in got]


@pytest.mark.parametrize(
    ("site", "proto", "dst"),
    [("site-esp", 50, "10.2.0.1"), ("site-udp", 17, "10.3.0.1"), ("site-gre", 47, "10.4.0.1"),
     ("site-gre", 47, "fd00:4::1")],
    ids=["esp", "esp-in-udp", "gre-v4", "gre-v6"],
)  # fmt: skip
def test_outer_ecn_is_a_copy_of_the_inner_ecn(lab: Lab, site: str, proto: int, dst: str) -> None:
    """RFC 6040 §4.1 normal mode: the outer ECN field copies the inner one
    (Not-ECT, ECT(1), ECT(0), CE); the inner DSCP (46 here) is not copied."""
    toses = [0x00, 0xB8 | 1, 0x02, 0xB8 | 3]
    got = _outer_headers(
        lab, site, proto, lambda: _send_udp_from_host(lab, dst, toses), lambda g: len(g) >= 4
    )
    assert [h[1] for h in got[:4]] == [0, 1, 2, 3]


def test_esp_in_udp_outer_ce_reaches_the_inner_packet(lab: Lab) -> None:
    """RFC 6040 §4.2 on port 4500 too (IP_RECVTOS): outer CE over an ECT(0)
    inner packet arrives at the host as CE; over a Not-ECT one it is dropped
    and counted as ``ecn``."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    sa_ = SecurityAssociation(
        ESP, spi=0x1002, crypt_algo="AES-CBC", crypt_key=CBC_KEY_IN,
        auth_algo="SHA2-256-128", auth_key=CBC_IKEY_IN,
    )  # fmt: skip

    def esp(tos: int) -> bytes:
        inner = IP(src="10.3.0.1", dst="10.1.0.2", tos=tos) / UDP(sport=7, dport=5999) / b"ce"
        return bytes(sa_.encrypt(IP(src=SITES["esp"], dst=ANYCAST) / inner)[ESP])

    with tun.in_netns(lab.ns("host").name):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tun.in_netns(lab.ns("site-esp").name):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("10.1.0.2", 5999))
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        rx.settimeout(4)
        tx.bind((SITES["esp"], 4502))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x03)  # outer CE
        before = lab.drops("ecn")
        tx.sendto(esp(0x02), (ANYCAST, 4500))  # inner ECT(0)
        data, anc, _, _ = rx.recvmsg(100, 64)
        assert data == b"ce"
        assert [d[0] & 3 for lvl, t, d in anc if (lvl, t) == (0, socket.IP_TOS)] == [3]
        tx.sendto(esp(0x00), (ANYCAST, 4500))  # inner Not-ECT: must be dropped
        _wait(lambda: lab.drops("ecn") > before, 4, "the ecn drop in /metrics")
    finally:
        rx.close()
        tx.close()


# ---- IKE relay -----------------------------------------------------------------

IKE_HEADER = bytes(8) + bytes(8) + bytes([0x21, 0x20, 0x22, 0x08]) + bytes(4) + (28).to_bytes(4)


@pytest.mark.parametrize("port", [500, 4500])
def test_ike_is_relayed_to_control_and_answered_from_the_anycast_address(
    lab: Lab, port: int
) -> None:
    marker = b"\x00\x00\x00\x00" if port == 4500 else b""
    with tun.in_netns(lab.ns("site-esp").name):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((SITES["esp"], port))
        s.settimeout(5)
        try:
            s.sendto(marker + IKE_HEADER, (ANYCAST, port))
            data, src = s.recvfrom(2048)
        finally:
            s.close()
    assert src == (ANYCAST, port)  # the reply left from the worker's anycast socket
    assert data == marker + b"reply:" + IKE_HEADER  # marker stripped to control, re-added
    d = lab.relayed[-1]
    assert (d.remote_addr, d.remote_port, d.local_addr, d.local_port) == (
        SITES["esp"], port, ANYCAST, port,
    )  # fmt: skip
    assert d.worker_id.startswith("n1/")


def test_account_added_and_removed_under_traffic_of_another(lab: Lab) -> None:
    """Issue 10: account C comes and goes on the bus (its netns and TUN are
    created, then removed by the worker); account A's pings lose nothing."""
    c = "acct-c"
    c_ns = PREFIX + c
    pinger = lab.ns("host").popen(
        ["ping", "-c", "25", "-i", "0.1", "-w", "15", "10.2.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    c_tunnel = tunnel(20, account=c, kind=TunnelKind.GRE, local=ANYCAST, remote="172.31.20.2")
    c_route = route(20, "10.2.0.0/24", 20, account=c)  # overlaps A's prefix on purpose
    lab.publisher.set(c_tunnel)
    lab.publisher.set(c_route)
    _wait(lambda: tun.device_exists("aw0", netns_name=c_ns), 5, "account C's TUN")
    lab.publisher.delete(c_route.key)
    lab.publisher.delete(c_tunnel.key)
    _wait(lambda: not os.path.exists(f"/run/netns/{c_ns}"), 5, "account C's netns removed")
    out, _ = pinger.communicate(timeout=20)
    assert _received(out) == 25, out


# ---- two workers, SIGKILL one ----------------------------------------------------


def test_two_workers_share_the_anycast_address_and_survive_sigkill(lab: Lab) -> None:
    w1 = lab.start_worker(1)
    _wait(lambda: _metrics_ok(lab, 1), 15, "worker 1 /metrics")
    _wait(
        lambda: (
            lab.metrics(0).get("anywan_worker_node_live_workers") == 2
            and lab.metrics(1).get("anywan_worker_node_live_workers") == 2
        ),
        5,
        "both workers to see each other",
    )
    # both carry: run flows over all three tunnels, then look at both counters
    for dst in ("10.2.0.1", "10.3.0.1", "10.4.0.1", "fd00:2::1"):
        assert _received(ping(lab, "host", dst, count=2)) == 2
    time.sleep(0.7)
    carried = [
        sum(v for k, v in lab.metrics(i).items() if k.startswith("anywan_worker_tunnel_packets"))
        for i in (0, 1)
    ]
    assert sum(carried) > 0
    # SIGKILL worker 0: traffic continues through worker 1 (a short gap allowed)
    lab.workers[0].send_signal(signal.SIGKILL)
    lab.workers[0].wait(5)
    _wait(lambda: lab.metrics(1).get("anywan_worker_node_live_workers") == 1, 3, "takeover")
    for dst in ("10.2.0.1", "10.3.0.1", "10.4.0.1"):
        out = ping(lab, "host", dst, count=3)
        assert _received(out) == 3, out
    assert _received(ping(lab, "site-esp", "10.1.0.2", count=3, extra=("-I", "10.2.0.1"))) == 3
    # restart worker 0: it rebuilds its state from the bus
    lab.start_worker(0)
    _wait(lambda: _metrics_ok(lab, 0), 15, "worker 0 back")
    _wait(lambda: lab.metrics(0).get("anywan_worker_sas", 0) >= 6, 5, "worker 0 state")
    _wait(lambda: lab.metrics(0).get("anywan_worker_bus_pending_records") == 0, 3, "bus applied")
    # SIGUSR1: every thread's stack goes to the log, and the worker carries on
    w1.send_signal(signal.SIGUSR1)
    log1 = lab.tmp / "worker1.log"
    _wait(lambda: "most recent call first" in log1.read_text(errors="replace"), 3, "stack dump")
    assert w1.poll() is None and _metrics_ok(lab, 1)
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(10) == 0  # clean shutdown on SIGTERM
    _wait(lambda: lab.metrics(0).get("anywan_worker_node_live_workers") == 1, 3, "alone again")
    assert _received(ping(lab, "host", "10.2.0.1", count=3)) == 3


def _metrics_ok(lab: Lab, index: int) -> bool:
    try:
        return bool(lab.metrics(index))
    except OSError:
        return False


def test_bus_delete_route_stops_traffic_and_updates_tun_routes(lab: Lab) -> None:
    key = route(3, "10.3.0.0/24", 2, account=ACCOUNT_A).key
    rec = lab.publisher.get(key)
    lab.publisher.delete(key)
    try:
        _wait(
            lambda: "10.3.0.0/24" not in lab.ns("acct-a").run(["ip", "route"]).stdout,
            5,
            "the worker to withdraw the route from the account's TUN",
        )
        assert _received(ping(lab, "host", "10.3.0.1", count=1, deadline=2)) == 0
    finally:
        lab.publisher.set(rec)
    _wait(lambda: "10.3.0.0/24" in lab.ns("acct-a").run(["ip", "route"]).stdout, 5, "route back")
    assert _received(ping(lab, "host", "10.3.0.1", count=1)) == 1


def test_routes_removed_by_hand_are_put_back(lab: Lab) -> None:
    """A sync applies only what changed since the last one, so the workers
    must notice that someone else deleted one of their TUN routes, or set the
    TUN down (which takes every IPv4 route with it, silently), and repair it."""
    acct = lab.ns("acct-a")

    def repairs() -> float:
        return sum(
            lab.metrics(i).get("anywan_worker_tun_repairs_total", 0.0)
            for i, proc in lab.workers.items()
            if proc.poll() is None
        )

    def routes() -> str:
        return str(acct.run(["ip", "route"]).stdout)

    before = repairs()
    acct.run(["ip", "route", "del", "10.2.0.0/24", "dev", "aw0"])
    _wait(lambda: "10.2.0.0/24" in routes(), 3, "the deleted route back")
    assert _received(ping(lab, "host", "10.2.0.1", count=1)) == 1
    acct.run(["ip", "link", "set", "aw0", "down"])
    _wait(
        lambda: "10.4.0.0/24" in routes() and "10.2.0.0/24" in routes(),
        3,
        "the TUN up again with its routes",
    )
    assert _received(ping(lab, "host", "10.4.0.1", count=1)) == 1
    _wait(lambda: repairs() >= before + 2, 3, "anywan_worker_tun_repairs_total")
    # The TUN itself deleted: the workers make a new one, with its routes.
    acct.run(["ip", "link", "del", "aw0"])
    _wait(lambda: "10.2.0.0/24" in routes(), 5, "a new TUN with its routes")
    assert _received(ping(lab, "host", "10.2.0.1", count=2)) == 2


def test_peer_counts_are_sane(lab: Lab) -> None:
    """The scapy sites decrypted everything the worker sent them."""
    for kind, proc in lab.sites.items():
        assert proc.poll() is None, f"site {kind} died"
    _ = json  # counters are printed by the sites at exit (see logs on failure)


# ---- replay protection on: one sender per SA (owner mode) -------------------------

FLOWS = r"""
import socket, sys
base = int(sys.argv[1])
for p in range(40):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.1.0.2", base + p)); s.sendto(b"flow", ("10.2.0.1", 9)); s.close()
"""


def _seq_lines() -> list[list[str]]:
    return [ln.split() for ln in SEQ_LOG.read_text().splitlines()] if SEQ_LOG.exists() else []


def _seqs() -> list[int]:
    return [int(parts[0]) for parts in _seq_lines()]


def test_replay_protected_tunnel_has_one_sender_and_survives_owner_sigkill(lab: Lab) -> None:
    """DESIGN §5 owner mode, node-local: two workers; only the SA's owner
    sends on a replay-protected tunnel (the other hands it the cleartext), the
    peer sees strictly increasing sequence numbers, and after SIGKILL of the
    owner the survivor continues above the dead owner's reservation."""
    from dataclasses import replace

    from dataplane.worker import rendezvous_owner

    for i in (0, 1):
        if i not in lab.workers or lab.workers[i].poll() is not None:
            lab.start_worker(i)
    _wait(lambda: all(_metrics_ok(lab, i) for i in (0, 1)), 15, "two workers")
    _wait(
        lambda: all(lab.metrics(i).get("anywan_worker_node_live_workers") == 2 for i in (0, 1)),
        5,
        "both workers alive",
    )
    replay_before = {i: lab.drops("replay", i) for i in (0, 1)}
    t1 = next(r for r in records() if r.key == tunnel(1).key)
    lab.publisher.set(replace(t1, replay_protection=True))
    try:
        time.sleep(0.6)
        owner = rendezvous_owner(0x2001, (0, 1))
        other = 1 - owner
        start = len(_seqs())
        lab.ns("host").run([PY, "-c", FLOWS, "21000"])
        try:
            _wait(lambda: len(_seqs()) >= start + 40, 10, "the site to receive 40 flows")
        except AssertionError:
            dump = {
                i: {k: v for k, v in lab.metrics(i).items() if v and "created" not in k}
                for i in (0, 1)
            }
            raise AssertionError(
                f"got {len(_seqs()) - start} of 40; owner {owner}; {dump}"
            ) from None
        before = _seqs()[start:]
        assert before == sorted(before) and len(set(before)) == len(before), before
        _wait(
            lambda: lab.metrics(other).get("anywan_worker_replay_handoff_packets_total", 0) > 0,
            3,
            "the non-owner to hand packets to the owner",
        )
        assert lab.metrics(owner).get("anywan_worker_replay_handoff_packets_total", 0) == 0
        # owner mode is outbound only: no inbound replay verdict may appear
        assert {i: lab.drops("replay", i) for i in (0, 1)} == replay_before
        lab.workers[owner].send_signal(signal.SIGKILL)
        lab.workers[owner].wait(5)
        _wait(lambda: lab.metrics(other).get("anywan_worker_node_live_workers") == 1, 3, "1 left")
        time.sleep(0.3)
        mid = len(_seqs())
        lab.ns("host").run([PY, "-c", FLOWS, "22000"])
        _wait(lambda: len(_seqs()) >= mid + 40, 15, "40 more flows after the takeover")
        after = _seqs()[mid:]
        assert after == sorted(after) and min(after) > max(before), (before[-3:], after[:3])
        assert lab.drops("replay", other) == replay_before[other]
    finally:
        lab.publisher.set(t1)


def test_replies_on_a_replay_protected_tunnel_reach_the_owner_without_hand_off(
    lab: Lab,
) -> None:
    """Two workers; tunnel 1 replay-protected. The site's ESP (SPI 0x1001)
    reaches worker 1 (raw-socket share filter: SPI % 2), the outbound SA's
    owner is worker 0. Worker 1 writes the inbound packets into worker 0's
    TUN queue (the fd worker 0 passed it), so the kernel queues the host's
    replies to worker 0, which sends them itself: a TCP exchange started by
    the site needs (almost) no hand-off, where writing into its own queue
    would hand every reply over."""
    from dataclasses import replace

    from dataplane.worker import rendezvous_owner

    for i in (0, 1):
        if i not in lab.workers or lab.workers[i].poll() is not None:
            lab.start_worker(i)
    _wait(lambda: all(_metrics_ok(lab, i) for i in (0, 1)), 15, "two workers")

    def holds_the_others_queues(i: int) -> bool:
        m = lab.metrics(i)  # one queue per account
        return m.get("anywan_worker_peer_tun_queues") == m.get("anywan_worker_accounts") == 2

    _wait(lambda: all(holds_the_others_queues(i) for i in (0, 1)), 10, "the other's queues")
    assert rendezvous_owner(0x2001, (0, 1)) == 0 and 0x1001 % 2 == 1  # the premise
    t1 = next(r for r in records() if r.key == tunnel(1).key)
    lab.publisher.set(replace(t1, replay_protection=True))
    try:
        time.sleep(0.6)
        handoffs = "anywan_worker_replay_handoff_packets_total"
        before = {i: lab.metrics(i) for i in (0, 1)}
        assert _exchange(lab, "host", "site-esp", "10.1.0.2", "tcp", 50_000) == "ECHO50003"
        time.sleep(0.7)  # a counter flush
        after = {i: lab.metrics(i) for i in (0, 1)}

        def delta(i: int, name: str) -> float:
            return after[i].get(name, 0) - before[i].get(name, 0)

        tid1 = tunnel(1).tunnel_id
        received = tunnel_packets(after[1], tid1, "in") - tunnel_packets(before[1], tid1, "in")
        sent = tunnel_packets(after[0], tid1, "out") - tunnel_packets(before[0], tid1, "out")
        assert received >= 20, received  # the site's packets came in through worker 1
        assert sent >= 20, sent  # the replies left through the owner
        assert delta(1, handoffs) <= 2, delta(1, handoffs)
        # The owner dies: worker 1 closes its copies of the dead worker's
        # queues at once (pidfd), so no queue is left that nobody reads, and
        # the exchange goes on through worker 1 alone.
        lab.workers[0].send_signal(signal.SIGKILL)
        lab.workers[0].wait(5)
        _wait(lambda: lab.metrics(1).get("anywan_worker_peer_tun_queues") == 0, 2, "copies closed")
        _wait(lambda: lab.metrics(1).get("anywan_worker_node_live_workers") == 1, 3, "1 left")
        assert _exchange(lab, "host", "site-esp", "10.1.0.2", "tcp", 50_000) == "ECHO50003"
    finally:
        lab.publisher.set(t1)


def test_gcm_ivs_never_repeat_across_worker_restarts(lab: Lab) -> None:
    """RFC 4106 §3.1: every ESP packet the site received in this whole run,
    from several workers and across SIGKILL + restart of one index, carried a
    different IV under the one outbound key."""
    assert _received(ping(lab, "host", "10.2.0.1", count=2)) == 2
    ivs = [parts[1] for parts in _seq_lines()]
    assert len(ivs) > 10
    assert len(set(ivs)) == len(ivs)
    assert len({iv[:8] for iv in ivs}) >= 3  # several worker ids (incl. the restart)
