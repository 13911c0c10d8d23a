"""Packet rate of real ``anywan-worker`` processes: ``python -m bench.pktrate``.

    python -m bench.pktrate [--quick] [--json F]      (root: netns ``awb-p-<pid>-``)

Why this suite: ``bench.throughput`` loads the worker with strongSwan
kernel-libipsec initiators and iperf3 on the same two cores; they take most
of the CPU, so the worker's packet rate and its 2-worker scaling cannot show.
Here the load generator is cheap — pre-built packets handed to the kernel 64
at a time — so the *workers* are what runs out of CPU.

Topology (one run, every cell)::

    gen (the "site", 198.51.100.2) ── veth ── node (203.0.113.1 on lo)
      generator (decap) and sink (encap)        anywan-worker 0 [and 1]
                                                  │ multi-queue TUN aw0
                                                account netns (made by the workers)
                                                  generator (encap) and sink (decap)

The workers are ``python -m dataplane.cli`` with ``--netns node``,
``--state-file`` (msgpack records: one tunnel per kind — AES-256-GCM and
AES-256-CBC+HMAC-SHA-256-128 ESP in UDP 4500, and GRE — each with a route to
its own site prefix), ``--netns-template`` (they create the account
namespace and its TUN themselves), ``--run-dir`` and ``--metrics-port``.
Worker 0 runs for the whole suite; "2 workers" starts worker 1 beside it
(``--workers 2`` for both), "1 worker" stops it again, in ABBA order cell by
cell so machine drift hits 1w and 2w alike.

* **decap, ESP** (site → core): ``gen`` sends ESP-in-UDP packets built once
  with our own ``OutboundSa`` codec from the worker's inbound SA record
  (unique sequence numbers per batch; the tunnel runs with
  ``replay_protection`` off and replay window 0 — the Magic WAN anycast mode,
  so re-sending the same batches is legal), with UDP GSO: one ``sendmsg``
  with a ``UDP_SEGMENT`` control message carries up to 64 equal-size
  datagrams, from ``FLOWS`` source ports so SO_REUSEPORT spreads them over the
  workers. The GSO packet crosses the veth whole and, because the workers'
  port-4500 sockets have UDP GRO on, reaches a worker as one ``recvmsg`` of
  up to 64 datagrams — what GRO on a real NIC would hand it.
* **decap, GRE**: raw GRE cannot use GSO; ``gen`` fills an ``AF_PACKET``
  TPACKET_V2 TX ring (mmap) with Ethernet + IPv4 + GRE frames once and flushes
  64 frames per ``send()`` (``FLOWS`` inner flows, so the workers' GRE share
  filter spreads them). The kernel still processes every frame one by one,
  in the generator's ``send()`` (veth → node's IP input → both raw sockets).
* **encap** (core → site): in the account namespace, a UDP GSO sender sends
  inner packets (64 per ``sendmsg``, ``FLOWS`` destination ports) to the
  site prefix the tunnel's route covers; the kernel cuts them into single
  packets in front of the TUN (it has no UDP segmentation offload), the
  multi-queue TUN spreads the flows over the workers' queues, the workers
  encrypt / GRE-encapsulate and send to ``gen``.
* **sinks**: an nftables rule at prerouting (priority raw) drops and counts
  what arrives — decapsulated inner packets in the account namespace,
  encapsulated outer packets in ``gen`` — so no stack above processes them.

Rate: the generator is paced adaptively (``--pace adaptive``, the default).
Every 10 ms it looks where its excess goes. Decap: the workers' socket
receive queues and drops (``/proc/<pid>/net/udp`` or ``raw`` of the node
namespace): it speeds up 4 % while any worker's queue holds less than
``QUEUE_HIGH`` (2 MiB of 8) and slows 5 % once all hold more, or once
``MAX_DROP_SHARE`` (30 %) of what it sent was dropped — so every worker
always has work queued, even when the flow hash gives one of them more flows.
Encap: a TUN's queue cannot be seen, only its TX drops, so it keeps about
``DROP_TARGET`` (10 %) of its packets dropped there. An unpaced sender (a
TUN has no back-pressure; ``--pace max``) would burn the CPU the second
worker needs. The GRE ring also back-pressures by itself: a frame is reused
only when the kernel gave it back (zero copy: its pages stay with the
packet until a worker read it). What is measured is what the **workers** carried:
their ``anywan_worker_tunnel_packets_total`` counters (``/metrics``,
flushed every 0.5 s) between two flushes seen by polling, ``--window`` s apart
(5 s; 1 s with ``--quick``), after a warm-up. Each row also records the
generator's sent rate, the drops (socket / TUN / worker drop reasons /
``softnet_stat``), the sink's counter, the CPU share of every worker and of
the generator (``bench.throughput.CpuWatch``: ``/proc/<pid>/stat``) and the
machine's busy and softirq shares.

What limits the numbers and what is included: the machine has two cores for
everything. Decap: the worker's ``recvmsg`` (one per GSO batch), Python,
decryption, and its TUN ``write`` per packet — which includes the kernel's
input processing of the inner packet up to the nftables drop — are in the
worker's CPU; the generator's ``sendmsg`` runs the node's IP input and
socket lookup for the GSO packet (once per 64 packets) in its own context.
GRE decap: the generator's ``send()`` carries the kernel's per-frame work
(veth, IP input, a copy to every worker's raw socket, the BPF share filter)
— that is the expensive part of the generator. Encap: the generator's
``sendmsg`` does the segmentation and the TUN queueing for every packet; the
worker's CPU has its TUN ``read`` per packet, Python, encryption, and its
UDP GSO ``sendmsg`` (or one raw ``sendto`` per GRE packet) including the
veth and ``gen``'s input up to the nftables drop when the kernel runs it in
the worker's context (softirq work can also land in ``ksoftirqd``; it is in
the machine share). With one worker, the worker's busiest thread near 100 %
means the worker is the limit; with two, the machine at ~100 % means the two
workers and the generator's kernel work share the two cores — the 2w ÷ 1w
ratio cannot reach 2 when the generator needs a slice of a core. Nothing is
pinned to a core. Not included: IKE (SAs come from the state file), the
replication bus, replay protection, real NICs (veth has no interrupts and
no wire).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import emit
from dataplane.sockets import SOL_UDP, UDP_SEGMENT
from deploy import scrape

#: Namespace prefix; each run adds its PID (deploy.netns.unique_prefix). Tests
#: get ``awt-p-`` (``ANYWAN_PKTRATE_NETNS_PREFIX``, or an ``awt-`` value of
#: ``ANYWAN_BENCH_NETNS_PREFIX`` as ``bench.run``'s tests set it).
PREFIX = os.environ.get("ANYWAN_PKTRATE_NETNS_PREFIX") or (
    "awt-p-" if os.environ.get("ANYWAN_BENCH_NETNS_PREFIX", "").startswith("awt-") else "awb-p-"
)
ANYCAST = "203.0.113.1"
SITE = "198.51.100.2"
NODE_LINK = "198.51.100.1"
ACCOUNT = "bench"
CORE_ADDR = "10.2.0.1"
"""The account namespace's own address: inner destination of decap, source of encap."""
KINDS = ("aes256gcm", "aes256cbc-sha256", "gre")
SIZES = (64, 1400)
OPS = ("encap", "decap")
FLOWS = 32
MAX_SEGMENTS = 64
DROP_TARGET = 0.10
"""Pacing into a TUN: the share of sent packets the generator lets the TUN drop."""
QUEUE_HIGH = 2 << 20
"""Pacing into sockets: slow down once every worker's receive queue holds this
many bytes (of 8 MiB: the workers ask for 4 MiB, the kernel doubles it)."""
MAX_DROP_SHARE = 0.3
"""...or once this share of the sent packets is dropped (one worker's flows)."""
CONTROL_INTERVAL = 0.01
METRICS_PORT = 9201
GRE_TTL = 64


def log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kind_index(kind: str) -> int:
    return KINDS.index(kind)


def tunnel_id(kind: str) -> str:
    return f"{kind_index(kind) + 1:032x}"


def site_prefix(kind: str) -> str:
    """The site LAN the kind's tunnel routes (encap destinations)."""
    return f"10.1.{kind_index(kind)}.0/24"


def site_host(kind: str) -> str:
    return f"10.1.{kind_index(kind)}.2"


def segments(size: int, outer: int | None = None) -> int:
    """Datagrams per GSO send: at most 64, and at most 65507 octets of UDP payload."""
    return max(1, min(MAX_SEGMENTS, 65507 // (outer if outer is not None else size - 28)))


# --------------------------------------------------------------------------
# records (the workers' state file; the generator reads it too)
# --------------------------------------------------------------------------


def records() -> list[Any]:
    from replication.records import (
        Cipher,
        Direction,
        Integ,
        RouteRecord,
        SaRecord,
        TrafficSelector,
        TunnelKind,
        TunnelRecord,
    )

    anyts = (TrafficSelector.from_network("0.0.0.0/0"),)
    out: list[Any] = []
    for kind in KINDS:
        i = kind_index(kind)
        tid = tunnel_id(kind)
        gre = kind == "gre"
        out.append(
            TunnelRecord(
                account_id=ACCOUNT, tunnel_id=tid, kind=TunnelKind.GRE if gre else TunnelKind.IPSEC,
                name=kind, local_addr=ANYCAST, remote_addr=SITE,
                interface_address=f"10.255.0.{2 * i}/31", mtu=1500, replay_protection=False,
                ttl=GRE_TTL,
            )
        )  # fmt: skip
        out.append(
            RouteRecord(account_id=ACCOUNT, route_id=f"{i + 1:032x}", prefix=site_prefix(kind),
                        tunnel_id=tid)
        )  # fmt: skip
        if gre:
            continue
        gcm = kind == "aes256gcm"
        for direction, spi in ((Direction.IN, 0x1000 + i), (Direction.OUT, 0x2000 + i)):
            out.append(
                SaRecord(
                    account_id=ACCOUNT, tunnel_id=tid, spi=spi, direction=direction,
                    local_addr=ANYCAST, remote_addr=SITE, udp_encap=True, local_port=4500,
                    remote_port=4500,
                    cipher=Cipher.AES256GCM16 if gcm else Cipher.AES256CBC,
                    integ=Integ.NONE if gcm else Integ.SHA256_128,
                    enc_key=os.urandom(32), salt=os.urandom(4) if gcm else b"",
                    integ_key=b"" if gcm else os.urandom(32), replay_window=0,
                    ts_local=anyts, ts_remote=anyts, child_id=1, generation=0, created=0.0,
                    rekey_at=0.0, expire_at=0.0,
                )
            )  # fmt: skip
    return out


def write_state(path: Path) -> None:
    import msgpack

    from replication.records import encode

    recs = records()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # keys inside
    with os.fdopen(fd, "wb") as fh:
        fh.write(msgpack.packb([[r.key, encode(r)] for r in recs]))


def _inbound_sa(state: Path, kind: str) -> Any:
    import msgpack

    from replication.records import Direction, SaRecord, decode

    tid = tunnel_id(kind)
    for _key, data in msgpack.unpackb(state.read_bytes(), raw=False):
        rec = decode(data)
        if isinstance(rec, SaRecord) and rec.tunnel_id == tid and rec.direction == Direction.IN:
            return rec
    raise LookupError(f"no inbound SA for {kind} in {state}")


# --------------------------------------------------------------------------
# the generator (a child process in gen or the account namespace)
# --------------------------------------------------------------------------


def inner_packet(size: int, src: str, dst: str, sport: int, dport: int) -> bytearray:
    """An IPv4/UDP packet of ``size`` octets (valid IP checksum, UDP checksum 0)."""
    from dataplane import ip

    pkt = bytearray(size)
    ip.write_ipv4_header(
        pkt, 0, src=socket.inet_aton(src), dst=socket.inet_aton(dst), proto=17,
        payload_len=size - 20,
    )  # fmt: skip
    ip.write_udp_header(pkt, 20, sport=sport, dport=dport, payload_len=size - 28)
    return pkt


def read_probe(source: dict[str, Any]) -> tuple[int | None, int]:
    """Where the generator's excess goes: (the smallest receive queue, in
    bytes, over the workers' sockets — None for the TUN, whose queue is not
    visible —, drops so far in packets)."""
    kind = source["kind"]
    try:
        with open(source["path"]) as fh:
            text = fh.read()
    except OSError:
        return None, 0
    if kind in ("udp", "raw"):
        # /proc/net/{udp,raw}: local address:port, tx:rx queue, ..., drops (last);
        # a raw socket shows its protocol as the port (GRE: 002F)
        port = source["port"]
        queues: list[int] = []
        drops = 0
        for ln in text.splitlines()[1:]:
            f = ln.split()
            if len(f) > 12 and f[1].endswith(port):
                with contextlib.suppress(ValueError):
                    queues.append(int(f[4].split(":")[1], 16))
                    drops += int(f[-1])
        # a UDP drop is one skb: one GSO batch of per_skb datagrams
        return (min(queues) if queues else None), drops * int(source.get("per_skb", 1))
    if kind == "netdev-tx":
        for ln in text.splitlines():
            name, _, rest = ln.partition(":")
            if name.strip() == source["dev"]:
                with contextlib.suppress(ValueError, IndexError):
                    return None, int(rest.split()[11])
        return None, 0
    raise ValueError(f"unknown drop source {kind}")


class _Sender:
    """Sends one batch of ``segs`` packets of flow ``k`` per call."""

    segs = 1

    def send(self, k: int) -> int:
        """Hand the kernel one batch of flow ``k``; returns the packets taken."""
        raise NotImplementedError


class _UdpGso(_Sender):
    def __init__(self, socks: list[socket.socket], bufs: list[bytes], seg: int, segs: int,
                 dests: list[tuple[str, int]]) -> None:  # fmt: skip
        self.socks, self.bufs, self.dests, self.segs = socks, bufs, dests, segs
        self.anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))]
        self.errors = 0

    def send(self, k: int) -> int:
        try:
            self.socks[k].sendmsg([self.bufs[k]], self.anc, 0, self.dests[k])
        except OSError:
            self.errors += 1
            return 0
        return self.segs


def _esp_sender(spec: dict[str, Any]) -> _UdpGso:
    """ESP-in-UDP from ``FLOWS`` source ports, one GSO batch per flow."""
    from dataplane import esp
    from replication.records import Direction

    rec = _inbound_sa(Path(spec["state"]), spec["kind"])
    sa = esp.OutboundSa.from_record(dataclasses.replace(rec, direction=Direction.OUT))
    size, flows = spec["size"], spec["flows"]
    scratch = bytearray(size + 512)
    outer = len(inner_packet(size, SITE, SITE, 1, 1)) + sa.overhead(size)
    segs = segments(size, outer)
    socks, bufs = [], []
    for k in range(flows):
        inner = inner_packet(size, site_host(spec["kind"]), CORE_ADDR, 40000 + k, 9)
        buf = bytearray()
        for _ in range(segs):
            n = sa.encapsulate_into(scratch, 0, inner, 4)
            assert n == outer, (n, outer)
            buf += scratch[:n]
        bufs.append(bytes(buf))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((SITE, 41000 + k))
        socks.append(s)
    return _UdpGso(socks, bufs, outer, segs, [(ANYCAST, 4500)] * flows)


def _inner_sender(spec: dict[str, Any]) -> _UdpGso:
    """Plain UDP from the account namespace to the site prefix, GSO."""
    size, flows = spec["size"], spec["flows"]
    payload = size - 28
    segs = segments(size)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CORE_ADDR, 9))
    buf = bytes(payload * segs)
    dst = site_host(spec["kind"])
    return _UdpGso([s] * flows, [buf] * flows, payload, segs,
                   [(dst, 40000 + k) for k in range(flows)])  # fmt: skip


class _GreRing(_Sender):
    """AF_PACKET TPACKET_V2 TX ring: frames written once; per batch, ``segs``
    frame statuses set to SEND_REQUEST and one ``send()`` flushes them."""

    SOL_PACKET = 263
    PACKET_VERSION = 10
    PACKET_TX_RING = 13
    TPACKET_V2 = 1
    DATA_OFF = 32  # TPACKET_ALIGN(sizeof(struct tpacket2_hdr))
    FRAME = 2048
    BLOCK = 1 << 16

    def __init__(self, spec: dict[str, Any]) -> None:
        from dataplane import gre, ip

        size, flows = spec["size"], spec["flows"]
        self.segs = MAX_SEGMENTS
        nframes = flows * self.segs
        per_block = self.BLOCK // self.FRAME
        nblocks = -(-nframes // per_block)
        self.nframes = nblocks * per_block
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.setsockopt(self.SOL_PACKET, self.PACKET_VERSION, self.TPACKET_V2)
        s.setsockopt(
            self.SOL_PACKET,
            self.PACKET_TX_RING,
            struct.pack("IIII", self.BLOCK, nblocks, self.FRAME, self.nframes),
        )
        self.ring = mmap.mmap(s.fileno(), self.BLOCK * nblocks, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        s.bind((spec["ifname"], 0))
        self.sock = s
        eth = bytes.fromhex(spec["dst_mac"].replace(":", "")) + bytes.fromhex(
            spec["src_mac"].replace(":", "")
        ) + b"\x08\x00"  # fmt: skip
        frames = []
        for k in range(flows):
            inner = inner_packet(size, site_host("gre"), CORE_ADDR, 40000 + k, 9)
            pkt = bytearray(14 + 20 + 4 + size)
            pkt[:14] = eth
            glen = gre.encapsulate_into(pkt, 34, inner, gre.ETH_P_IP)
            src, dst = socket.inet_aton(SITE), socket.inet_aton(ANYCAST)
            ip.write_ipv4_header(pkt, 14, src=src, dst=dst, proto=47, payload_len=glen)
            frames.append(bytes(pkt[: 34 + glen]))
        for j in range(self.nframes):
            f = frames[j % flows]
            base = j * self.FRAME
            struct.pack_into("III", self.ring, base, 0, len(f), len(f))
            self.ring[base + self.DATA_OFF : base + self.DATA_OFF + len(f)] = f
        self.status = memoryview(self.ring).cast("I")
        self.step = self.FRAME // 4
        self.pos = 0
        self.errors = 0
        self.busy = 0

    def send(self, k: int) -> int:
        # A frame's pages travel with its skb (zero copy): the kernel gives
        # the frame back (status AVAILABLE) only when every copy of the
        # packet is freed — e.g. read by a worker from its raw socket. A
        # frame still in flight is not reused: the ring is full, which is
        # back-pressure from the workers.
        st, step, pos, n = self.status, self.step, self.pos, self.nframes
        taken = 0
        for _ in range(self.segs):
            status = st[pos * step]
            if status not in (0, 4):  # AVAILABLE, WRONG_FORMAT
                self.busy += 1
                break
            if status:
                self.errors += 1
            st[pos * step] = 1  # TP_STATUS_SEND_REQUEST
            taken += 1
            pos += 1
            if pos == n:
                pos = 0
        self.pos = pos
        if taken:
            try:
                self.sock.send(b"")
            except OSError:
                self.errors += 1
        return taken


def gen_main(spec_path: str) -> int:
    """Child: send as told by the JSON spec until SIGTERM; a stats line on
    SIGUSR1 and at the end: ``{"t", "sent", "drops", "rate"}``."""
    spec = json.loads(Path(spec_path).read_text())
    mode = spec["mode"]
    if mode == "esp":
        sender: _Sender = _esp_sender(spec)
    elif mode == "inner":
        sender = _inner_sender(spec)
    elif mode == "gre-ring":
        sender = _GreRing(spec)
    else:
        raise SystemExit(f"unknown generator mode {mode}")
    flows = spec["flows"]
    segs = sender.segs
    drops_src = spec["drops"]
    adaptive = spec.get("pace", "adaptive") == "adaptive"
    target = float(spec.get("drop_target", DROP_TARGET))
    state = {"running": True, "report": False}

    def on_term(signum: int, frame: Any) -> None:
        state["running"] = False

    def on_usr1(signum: int, frame: Any) -> None:
        state["report"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    sent = 0
    rate = float(spec.get("fixed_rate") or spec.get("start_rate", 50_000.0))
    drops0 = read_probe(drops_src)[1]
    last_drops, last_sent = drops0, 0
    qhigh = int(spec.get("queue_high", QUEUE_HIGH))
    fixed = bool(spec.get("fixed_rate"))
    now = time.monotonic()
    next_ctl = now + CONTROL_INTERVAL
    last = now
    credit = 0.0
    k = 0
    print(json.dumps({"ready": True, "segs": segs}), flush=True)
    deadline = now + float(spec.get("max_seconds", 120.0))
    while state["running"] and now < deadline:
        if state["report"]:
            state["report"] = False
            d = read_probe(drops_src)[1] - drops0
            print(json.dumps({"t": time.monotonic(), "sent": sent, "drops": d, "rate": rate,
                              "errors": getattr(sender, "errors", 0),
                              "ring_busy": getattr(sender, "busy", 0)}), flush=True)  # fmt: skip
        now = time.monotonic()
        if not adaptive:
            for _ in range(8):
                sent += sender.send(k)
                k = k + 1 if k + 1 < flows else 0
            continue
        if now >= next_ctl and not fixed:
            q, d = read_probe(drops_src)
            ds, dd = sent - last_sent, d - last_drops
            if ds > 0:
                # TUN: only its drops are visible; sockets: every worker's
                # queue holds work, and few drops
                over = dd > target * ds if q is None else q > qhigh or dd > MAX_DROP_SHARE * ds
                rate *= 0.95 if over else 1.04
                rate = min(max(rate, 5_000.0), 20e6)
            last_sent, last_drops = sent, d
            next_ctl = now + CONTROL_INTERVAL
        credit = min(credit + (now - last) * rate, max(rate * 0.004, 2.0 * segs))
        last = now
        if credit < segs:
            time.sleep(0.0002)
            continue
        while credit >= segs:
            n = sender.send(k)
            k = k + 1 if k + 1 < flows else 0
            sent += n
            credit -= segs
            if n < segs:  # the ring is full of frames in flight
                time.sleep(0.0002)
                break
    d = read_probe(drops_src)[1] - drops0
    errors, busy = getattr(sender, "errors", 0), getattr(sender, "busy", 0)
    print(json.dumps({"t": time.monotonic(), "sent": sent, "drops": d, "rate": rate,
                      "errors": errors, "ring_busy": busy, "final": True}), flush=True)  # fmt: skip
    return 0


# --------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------


class Metrics:
    """Reads the workers' ``/metrics`` (127.0.0.1:METRICS_PORT+i in ``node``)
    with sockets opened inside the namespace: no ``curl`` fork per poll."""

    def __init__(self, ns_name: str) -> None:
        self.ns = ns_name

    def get(self, i: int, timeout: float = 2.0) -> str:
        from deploy.netns import in_namespace

        def connect() -> socket.socket:
            return socket.create_connection(("127.0.0.1", METRICS_PORT + i), timeout=timeout)

        s: socket.socket = in_namespace(self.ns, connect)
        try:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            chunks = []
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        finally:
            s.close()
        return b"".join(chunks).decode(errors="replace").partition("\r\n\r\n")[2]

    @staticmethod
    def parse(body: str, tid: str, direction: str) -> tuple[float, float, dict[str, float]]:
        """(packets, bytes) of one tunnel and direction, and the drop reasons."""
        pk = scrape.total(
            body, "anywan_worker_tunnel_packets_total", tunnel=tid, direction=direction
        )
        by = scrape.total(body, "anywan_worker_tunnel_bytes_total", tunnel=tid, direction=direction)
        drops = {
            labels["reason"]: v
            for labels, v in scrape.samples(body, "anywan_worker_drops_total")
            if v and "reason" in labels
        }
        return pk, by, drops


def _softirq_ticks() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    return vals[6], sum(vals)


def _softnet_dropped() -> int:
    total = 0
    with contextlib.suppress(OSError), open("/proc/net/softnet_stat") as fh:
        for ln in fh:
            total += int(ln.split()[1], 16)
    return total


def _nft_counter(ns: Any) -> tuple[int, int]:
    res = ns.run(["nft", "list", "table", "ip", "awpk"], check=False, timeout=10)
    m = re.search(r"counter packets (\d+) bytes (\d+)", res.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class SetupError(RuntimeError):
    pass


class Bench:
    def __init__(self, prefix: str, run_dir: Path, log: Callable[[str], None]) -> None:
        from deploy.netns import Topology

        self.prefix = prefix
        self.gen_rate = 0.0
        self.pace = "adaptive"
        """Packets/s for a generator at a fixed rate (no pacing); 0: paced."""
        self.run_dir = run_dir
        self.log = log
        self.topo = Topology(prefix)
        self.workers: list[subprocess.Popen[Any] | None] = [None, None]
        self.state = run_dir / "state.msgpack"
        self.acct_name = f"{prefix}acct-{ACCOUNT}"
        self.acct: Any = None

    def build(self) -> None:
        from deploy.netns import Namespace

        t = self.topo
        self.gen = t.namespace("gen")
        self.node = t.namespace("node")
        t.veth(self.gen, "n", self.node, "g", addr_a=f"{SITE}/30", addr_b=f"{NODE_LINK}/30")
        self.node.addr("lo", f"{ANYCAST}/32")
        self.gen.route(f"{ANYCAST}/32", via=NODE_LINK)
        # the encap sink: outer packets from the workers end here, counted
        self.gen.nft(
            "table ip awpk {\n chain pre {\n  type filter hook prerouting priority raw;\n"
            f'  iifname "n" ip saddr {ANYCAST} counter drop\n }}\n}}\n'
        )
        write_state(self.state)
        self.start_worker(0)
        end = time.monotonic() + 30
        from dataplane import tun

        while not tun.device_exists("aw0", netns_name=self.acct_name):
            if time.monotonic() > end or (self.workers[0] and self.workers[0].poll() is not None):
                raise SetupError("worker 0 did not create the account TUN: " + self.tail(0))
            time.sleep(0.1)
        self.acct = Namespace(t, self.acct_name)
        t.namespaces["acct"] = self.acct
        self.acct.addr("lo", f"{CORE_ADDR}/32")
        # no IPv6 chatter (router solicitations, MLD) from aw0 into the workers
        for conf in ("all", "default", "aw0"):
            with contextlib.suppress(OSError):
                self.acct.sysctl(f"net.ipv6.conf.{conf}.disable_ipv6", 1)
        # the decap sink: inner packets the workers write to the TUN end here
        self.acct.nft(
            "table ip awpk {\n chain pre {\n  type filter hook prerouting priority raw;\n"
            f'  iifname "aw0" ip daddr {CORE_ADDR} counter drop\n }}\n}}\n'
        )
        self.wait_metrics(0)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            r = self.acct.run(["ip", "-4", "route", "show", "dev", "aw0"], check=False)
            if all(site_prefix(k) in r.stdout for k in KINDS):
                break
            time.sleep(0.2)
        else:
            raise SetupError("worker did not install the site routes in the account namespace")
        self.mac = {
            "n": self._mac(self.gen, "n"),
            "g": self._mac(self.node, "g"),
        }

    @staticmethod
    def _mac(ns: Any, ifname: str) -> str:
        return str(ns.ipr.get_links(ns.index(ifname))[0].get_attr("IFLA_ADDRESS"))

    def tail(self, i: int) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(
                (self.run_dir / f"worker{i}.log").read_text(errors="replace").splitlines()[-5:]
            )
        return ""

    def start_worker(self, i: int) -> None:
        log = open(self.run_dir / f"worker{i}.log", "ab")  # noqa: SIM115
        argv = [
            sys.executable, "-m", "dataplane.cli", "--netns", str(self.node.name),
            "--anycast", ANYCAST, "--index", str(i), "--workers", "2",
            "--run-dir", str(self.run_dir / "node"),
            "--netns-template", f"{self.prefix}acct-{{account}}",
            "--state-file", str(self.state), "--metrics-port", str(METRICS_PORT + i),
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.workers[i] = self.topo.root.popen(
            argv, stdout=log, stderr=log, cwd=str(Path(__file__).resolve().parent.parent)
        )
        log.close()

    def wait_metrics(self, i: int, timeout: float = 30.0) -> None:
        m = Metrics(str(self.node.name))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.workers[i]
            if p is None or p.poll() is not None:
                raise SetupError(f"worker {i} exited: " + self.tail(i))
            with contextlib.suppress(OSError):
                if "anywan_worker_tunnels" in m.get(i, 1.0):
                    return
            time.sleep(0.1)
        raise SetupError(f"worker {i}: no /metrics in {timeout:g} s: " + self.tail(i))

    def set_workers(self, n: int) -> None:
        """1: worker 0 alone; 2: worker 1 beside it (TUN queue and reuseport
        socket attached, share filters re-balanced)."""
        w1 = self.workers[1]
        if n == 2 and (w1 is None or w1.poll() is not None):
            self.start_worker(1)
            self.wait_metrics(1)
            time.sleep(0.6)  # both see each other's lock file (0.25 s housekeeping)
        elif n == 1 and w1 is not None:
            self.topo.stop(w1)
            self.workers[1] = None
            time.sleep(0.6)

    def close(self) -> None:
        self.topo.close()

    # -- one measurement -------------------------------------------------------
    def gen_spec(self, kind: str, size: int, op: str, pace: str) -> tuple[Any, dict[str, Any]]:
        w0 = self.workers[0]
        assert w0 is not None
        spec: dict[str, Any] = {
            "kind": kind, "size": size, "flows": FLOWS, "pace": pace, "state": str(self.state),
            "drop_target": DROP_TARGET, "fixed_rate": self.gen_rate,
        }  # fmt: skip
        if op == "encap":
            spec["mode"] = "inner"
            spec["drops"] = {"kind": "netdev-tx", "path": "/proc/self/net/dev", "dev": "aw0"}
            return self.acct, spec
        if kind == "gre":
            spec["mode"] = "gre-ring"
            spec.update(ifname="n", src_mac=self.mac["n"], dst_mac=self.mac["g"])
            spec["drops"] = {"kind": "raw", "path": f"/proc/{w0.pid}/net/raw", "port": ":002F"}
        else:
            from dataplane import esp
            from replication.records import Direction

            spec["mode"] = "esp"
            sa = esp.OutboundSa.from_record(
                dataclasses.replace(_inbound_sa(self.state, kind), direction=Direction.OUT)
            )
            per = segments(size, size + sa.overhead(size))
            spec["drops"] = {
                "kind": "udp", "path": f"/proc/{w0.pid}/net/udp", "port": ":1194", "per_skb": per,
            }  # fmt: skip
        return self.gen, spec

    def measure(
        self, kind: str, size: int, op: str, nworkers: int, *, warmup: float, window: float,
        pace: str,
    ) -> dict[str, Any]:  # fmt: skip
        from bench.throughput import CpuWatch, limiter

        self.pace = pace
        ns, spec = self.gen_spec(kind, size, op, pace)
        spec_path = self.run_dir / "gen.json"
        spec_path.write_text(json.dumps(spec))
        proc = ns.popen(
            [sys.executable, "-m", "bench.pktrate", "--gen", str(spec_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if '"ready"' not in line:
                err = proc.stderr.read()[-400:] if proc.stderr else ""
                raise SetupError(f"generator did not start: {line.strip()} {err}")
            time.sleep(warmup)
            return self._window(kind, size, op, nworkers, proc, window, CpuWatch, limiter)
        finally:
            self.topo.stop(proc)

    def _gen_stats(self, proc: subprocess.Popen[Any]) -> dict[str, Any]:
        assert proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        line = proc.stdout.readline()
        try:
            return dict(json.loads(line))
        except ValueError:
            raise SetupError(f"generator: no stats ({line.strip()[:200]})") from None

    def _boundary(
        self, m: Metrics, idx: list[int], tid: str, direction: str, timeout: float = 1.5
    ) -> dict[int, tuple[float, float, float, dict[str, float]]]:
        """For each worker: (time, packets, bytes, drops) at its next counter
        flush, found by polling /metrics every 25 ms."""
        first = {i: Metrics.parse(m.get(i), tid, direction) for i in idx}
        out: dict[int, tuple[float, float, float, dict[str, float]]] = {}
        end = time.monotonic() + timeout
        prev_t = time.monotonic()
        while len(out) < len(idx) and time.monotonic() < end:
            time.sleep(0.025)
            for i in idx:
                if i in out:
                    continue
                t0 = time.monotonic()
                pk, by, dr = Metrics.parse(m.get(i), tid, direction)
                if pk != first[i][0]:
                    out[i] = ((prev_t + t0) / 2, pk, by, dr)
            prev_t = time.monotonic()
        now = time.monotonic()
        for i in idx:  # a worker that carried nothing: its value now
            if i not in out:
                out[i] = (now, *first[i])
        return out

    def _window(
        self, kind: str, size: int, op: str, nworkers: int, proc: subprocess.Popen[Any],
        window: float, cpu_watch: Any, limiter: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:  # fmt: skip
        m = Metrics(str(self.node.name))
        tid = tunnel_id(kind)
        direction = "out" if op == "encap" else "in"
        idx = list(range(nworkers))
        pids = {f"anywan-worker {i}": p.pid for i, p in enumerate(self.workers) if p is not None}
        pids["generator"] = proc.pid
        watch = cpu_watch(pids)
        sink_ns = self.acct if op == "decap" else self.gen
        sink0 = _nft_counter(sink_ns)
        soft0, net0 = _softirq_ticks(), _softnet_dropped()
        watch.start()
        g0 = self._gen_stats(proc)
        b0 = self._boundary(m, idx, tid, direction)
        time.sleep(window)
        b1 = self._boundary(m, idx, tid, direction)
        g1 = self._gen_stats(proc)
        cpu = watch.stop()
        soft1, net1 = _softirq_ticks(), _softnet_dropped()
        sink1 = _nft_counter(sink_ns)
        per_pk: list[int] = []
        per_rate: list[float] = []
        reasons: dict[str, float] = {}
        gbits = 0.0
        for i in idx:
            t0, p0, by0, d0 = b0[i]
            t1, p1, by1, d1 = b1[i]
            dt = max(t1 - t0, 1e-3)
            per_pk.append(int(p1 - p0))
            per_rate.append((p1 - p0) / dt)
            gbits += (by1 - by0) * 8 / dt / 1e9
            for r, v in d1.items():
                if v - d0.get(r, 0.0):
                    reasons[r] = reasons.get(r, 0.0) + v - d0.get(r, 0.0)
        gdt = max(g1["t"] - g0["t"], 1e-3)
        total = sum(per_rate)
        procs = cpu.get("processes", {})
        worker_cores = (
            sum(v["cpu_pct"] for k, v in procs.items() if k.startswith("anywan-worker")) / 100
        )
        row: dict[str, Any] = {
            "suite": "pktrate",
            "kind": kind,
            "size": size,
            "op": op,
            "workers": nworkers,
            "kpps": round(total / 1e3, 1),
            "gbit_s": round(gbits, 3),
            "per_worker_kpps": [round(r / 1e3, 1) for r in per_rate],
            # the workers' efficiency, whatever CPU the scheduler gave them
            "kpps_per_worker_core": round(total / 1e3 / worker_cores, 1) if worker_cores else None,
            "per_worker_packets": per_pk,
            "window_s": round(window, 2),
            "pace": f"fixed {self.gen_rate / 1e3:g} kpps" if self.gen_rate else self.pace,
            "generator": {
                "sent_kpps": round((g1["sent"] - g0["sent"]) / gdt / 1e3, 1),
                "dropped_kpps": round((g1["drops"] - g0["drops"]) / gdt / 1e3, 1),
                "final_rate_kpps": round(g1["rate"] / 1e3, 1),
                "send_errors": g1.get("errors", 0) - g0.get("errors", 0),
                "ring_full": g1.get("ring_busy", 0) - g0.get("ring_busy", 0),
            },
            "sink": {
                "packets": sink1[0] - sink0[0],
                "bytes": sink1[1] - sink0[1],
                "note": "nftables counter at the sink (counts GSO packets as one in gen)",
            },
            "worker_drops": {k: int(v) for k, v in reasons.items()},
            "softnet_dropped": net1 - net0,
            "cpu": cpu,
            "softirq_pct": round(100 * (soft1[0] - soft0[0]) / max(soft1[1] - soft0[1], 1), 1),
            "limit": limiter(cpu),
        }
        return row


def cells(quick: bool) -> list[tuple[str, int, str]]:
    if quick:
        return [("aes256gcm", 64, "decap"), ("aes256gcm", 64, "encap"), ("gre", 64, "decap")]
    return [(k, s, o) for k in KINDS for s in SIZES for o in OPS]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["kind"], r["size"], r["op"], r["workers"]): r for r in rows if "kpps" in r}
    for r in rows:
        if "kpps" not in r or str(r.get("pace", "")).startswith("fixed"):
            continue  # a fixed-rate generator sets the figure: no goals
        if r["size"] == 64:
            r["goal_150kpps"] = r["kpps"] >= 150
        if r["workers"] == 2:
            one = index.get((r["kind"], r["size"], r["op"], 1))
            if one and one["kpps"] > 0:
                r["ratio_2w_1w"] = round(r["kpps"] / one["kpps"], 2)
                r["goal_1_6x"] = r["ratio_2w_1w"] >= 1.6


def run(
    *, quick: bool = False, log: Callable[[str], None] = log_default,
    window: float | None = None, pace: str = "adaptive",
    only: list[tuple[str, int, str]] | None = None, rate_kpps: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)", "rows": []}
    import shutil

    from deploy.netns import cleanup_prefix, unique_prefix

    window = window or (1.0 if quick else 5.0)
    warmup = 0.6 if quick else 1.5
    prefix = unique_prefix(PREFIX)
    run_dir = Path(tempfile.mkdtemp(prefix="anywan-bench-pk-"))
    os.chmod(run_dir, 0o700)
    bench = Bench(prefix, run_dir, log)
    bench.gen_rate = rate_kpps * 1e3
    rows: list[dict[str, Any]] = []
    todo = only or cells(quick)
    try:
        t0 = time.monotonic()
        bench.build()
        log(f"  topology and worker 0 up in {time.monotonic() - t0:.1f}s")
        current = 1
        for n, (kind, size, op) in enumerate(todo):
            order = (1, 2) if n % 2 == 0 else (2, 1)
            for w in order:
                t1 = time.monotonic()
                try:
                    if w != current:
                        bench.set_workers(w)
                        current = w
                    row = bench.measure(kind, size, op, w, warmup=warmup, window=window, pace=pace)
                except Exception as exc:
                    row = {
                        "suite": "pktrate", "kind": kind, "size": size, "op": op, "workers": w,
                        "status": f"not run: {str(exc)[-300:]}",
                    }  # fmt: skip
                    log(f"  {kind:<17} {size:>5} B {op:<5} {w}w: failed: {exc}")
                    rows.append(row)
                    continue
                rows.append(row)
                log(
                    f"  {kind:<17} {size:>5} B {op:<5} {w}w: {row['kpps']:>7.1f} kpps "
                    f"{row['gbit_s']:.3f} Gbit/s per worker {row['per_worker_kpps']} "
                    f"gen sent {row['generator']['sent_kpps']} kpps [{row['limit']}] "
                    f"({time.monotonic() - t1:.1f}s)"
                )
    finally:
        bench.close()
        cleanup_prefix(prefix)
        shutil.rmtree(run_dir, ignore_errors=True)
    add_ratios(rows)
    return {
        "rows": rows,
        "config": {
            "window_s": window,
            "warmup_s": warmup,
            "flows": FLOWS,
            "max_segments": MAX_SEGMENTS,
            "pace": f"fixed {rate_kpps:g} kpps" if rate_kpps else pace,
            "drop_target": DROP_TARGET,
            "cores": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--gen"]:
        return gen_main(argv[1])
    ap = argparse.ArgumentParser(prog="python -m bench.pktrate", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced matrix, 1 s windows (CI)")
    ap.add_argument("--json", type=Path, help="write the result here (default: stdout)")
    ap.add_argument("--window", type=float, help="seconds per measurement window")
    ap.add_argument("--pace", choices=("adaptive", "max"), default="adaptive")
    ap.add_argument(
        "--rate", type=float, default=0.0, metavar="KPPS",
        help="send at this fixed rate instead of pacing (what the workers carry below capacity)",
    )  # fmt: skip
    ap.add_argument("--kind", action="append", choices=KINDS)
    ap.add_argument("--size", action="append", type=int, choices=SIZES)
    ap.add_argument("--op", action="append", choices=OPS)
    args = ap.parse_args(argv)
    only = None
    if args.kind or args.size or args.op:
        only = [
            c
            for c in cells(False)
            if (not args.kind or c[0] in args.kind)
            and (not args.size or c[1] in args.size)
            and (not args.op or c[2] in args.op)
        ]
    res = run(quick=args.quick, window=args.window, pace=args.pace, only=only, rate_kpps=args.rate)
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
