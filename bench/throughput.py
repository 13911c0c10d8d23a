"""Tunnel throughput: anywan next to strongSwan's kernel-libipsec, same run.

    python -m bench.throughput [--quick] [--json out.json]    (root: netns ``awb-``)

One network-namespace topology serves every configuration; only the
*responder* changes::

    s1 (strongSwan initiator, iperf3 client on 10.10.1.1) ─┐
    s2 (strongSwan initiator, iperf3 client on 10.10.2.1) ─┤         ┌─ core link ─┐
    g1, g2 (deploy/gre_site.py, clients on 10.20.k.1) ─────┼── node ─┤             ├─ core
                                                           │ 203.0.113.1          │  10.200.0.10
                                           ctl (anywan-control) ─┘ └─ node-bench ─┘  iperf3 -s
                                                                (anywan's TUN aw0)

* ``plain``: no tunnel; the sites route to the core through ``node`` — the
  machine's ceiling for this topology (veth + forwarding + iperf3) and the
  anchor of the GRE rows (strongSwan has no GRE).
* ``strongswan``: one charon with kernel-libipsec in ``node`` is the
  responder for every site (the ESP thread of libipsec does all the work).
* ``anywan-1w`` / ``anywan-2w``: ``anywan-control serve`` in ``ctl`` and one or
  two ``anywan-worker`` processes in ``node`` (SO_REUSEPORT sockets, one
  multi-queue TUN); tunnels, PSKs and routes created through the REST API, as
  the lab does; the IKE goes through the workers' relay to control.

The initiators are the same in every configuration: one strongSwan charon
(kernel-libipsec) per site, ``SITES`` sites in parallel, each with its own
iperf3 client to its own iperf3 server port in the core, started together;
the figure is the sum. Several initiators are needed because one libipsec
initiator is as slow as one libipsec responder: with one site the number
would measure the initiator, not the responder. kernel-libipsec speaks ESP
only in UDP (RFC 3948), so every ESP packet here is ESP-in-UDP on port 4500,
and it enforces a 128-packet anti-replay window, so anywan's tunnels run with
``replay_protection`` (DESIGN §5). With two workers, SO_REUSEPORT spreads the
sites' UDP flows over the workers by a hash of the 4-tuple, so a run may put
both sites on one worker: the per-worker packet counts are recorded.

Tests (inner packets, iperf3 3.x, ``-t SECONDS``):

* ``tcp-up``: TCP, site → core (the responder *decapsulates*), Gbit/s of
  payload received;
* ``tcp-down``: TCP, core → site (``-R``: the responder *encapsulates*);
* ``udp1400`` / ``udp64``: UDP flood (``-b 0``) site → core with inner IPv4
  packets of 1400 and 64 octets (UDP payload 1372 / 36 B — the kernel-libipsec
  TUN has MTU 1400, so 1400 B is the largest unfragmented inner packet);
  received packets/s.

What limits each number is recorded with it: CPU time of every process
involved (``/proc/<pid>/stat``) and of its busiest thread
(``/proc/<pid>/task``), as % of one core over the test, and the whole
machine's busy share (``/proc/stat``). A busiest thread at ~100 % is the
bottleneck; a machine at ~100 % of both cores means the number is
CPU-starvation-limited (2 cores shared by everything: initiators, responder,
iperf3, the kernel's forwarding). Read the ratios, not the absolutes. Each
row also carries the figure *per core of the responder* (value ÷ the
responder's CPU share: charon, or the sum over anywan's workers), which
compares the two implementations' efficiency when the machine, not the
responder, is what ran out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import emit
from deploy import scrape

#: Namespace prefix; each run adds its PID (deploy.netns.unique_prefix), so
#: concurrent runs never sweep each other. Tests set ``awt-b-`` through
#: ``ANYWAN_BENCH_NETNS_PREFIX``.
PREFIX = os.environ.get("ANYWAN_BENCH_NETNS_PREFIX", "awb-") + "tp-"
ANYCAST = "203.0.113.1"
CORE_ADDR = "10.200.0.10"
CORE_NET = "10.200.0.0/24"
ACCOUNT = "bench"
ID_SUFFIX = "ipsec.anywan.example"
SITES = 2
BASE_PORT = 5201
GRE_BASE_PORT = 5301

#: name -> (label, swanctl ESP proposal; None = GRE)
CIPHERS: dict[str, tuple[str, str | None]] = {
    "aes256gcm": ("AES-256-GCM", "aes256gcm16"),
    "aes128gcm": ("AES-128-GCM", "aes128gcm16"),
    "aes256cbc-sha256": ("AES-256-CBC+HMAC-SHA256", "aes256-sha256"),
    "gre": ("GRE", None),
}
#: name -> (iperf3 args, unit, inner packet size)
TESTS: dict[str, tuple[list[str], str, int | None]] = {
    "tcp-up": ([], "Gbit/s", None),
    "tcp-down": (["-R"], "Gbit/s", None),
    "udp1400": (["-u", "-b", "0", "-l", "1372"], "kpps", 1400),
    "udp64": (["-u", "-b", "0", "-l", "36"], "kpps", 64),
}


class SetupError(RuntimeError):
    """A configuration could not be brought up; the row says 'not run: …'."""


def log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# CPU accounting from /proc
# --------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _ticks(path: str) -> int | None:
    try:
        with open(path) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _threads(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            t = _ticks(f"/proc/{pid}/task/{tid}/stat")
            if t is not None:
                out[int(tid)] = t
    return out


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        vals = [int(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class CpuWatch:
    """CPU % of one core per process (and its busiest thread) between start()
    and stop(); plus the machine's busy share of all cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {k: v for k, v in pids.items() if v}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.m0 = _machine_busy()
        self.p0 = {k: _ticks(f"/proc/{p}/stat") for k, p in self.pids.items()}
        self.th0 = {k: _threads(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, Any]:
        dt = max(time.monotonic() - self.t0, 1e-6)
        busy1, total1 = _machine_busy()
        busy0, total0 = self.m0
        procs: dict[str, Any] = {}
        for k, p in self.pids.items():
            a, b = self.p0.get(k), _ticks(f"/proc/{p}/stat")
            if a is None or b is None:
                continue
            th1 = _threads(p)
            best = max(
                ((t1 - self.th0[k].get(tid, t1)) for tid, t1 in th1.items()),
                default=0,
            )
            procs[k] = {
                "cpu_pct": round(100 * (b - a) / CLK_TCK / dt, 1),
                "busiest_thread_pct": round(100 * best / CLK_TCK / dt, 1),
            }
        return {
            "processes": procs,
            "machine_busy_pct": round(100 * (busy1 - busy0) / max(total1 - total0, 1), 1),
            "cores": os.cpu_count(),
        }


def responder_cpu(cpu: dict[str, Any]) -> float:
    """CPU % (of one core) of the responder: strongSwan's charon, or the sum
    over anywan's workers."""
    return float(
        sum(
            v["cpu_pct"]
            for k, v in cpu.get("processes", {}).items()
            if k == "charon responder" or k.startswith("anywan-worker")
        )
    )


def limiter(cpu: dict[str, Any]) -> str:
    """A one-line reading of what limited a measurement."""
    procs = cpu.get("processes", {})
    if not procs:
        return "unknown"
    name, top = max(procs.items(), key=lambda kv: kv[1]["busiest_thread_pct"])
    machine = cpu.get("machine_busy_pct", 0.0)
    text = f"{name} busiest thread {top['busiest_thread_pct']:.0f}%"
    if top["busiest_thread_pct"] >= 85:
        text += " (saturated)"
    text += f"; machine {machine:.0f}% busy"
    if machine >= 90:
        text += " (CPU-bound)"
    return text


def udp_counters(ns: Any) -> tuple[int, int]:
    """(InDatagrams, RcvbufErrors) of namespace ``ns`` (/proc/net/snmp)."""
    res = ns.run(["cat", "/proc/net/snmp"], check=False, timeout=10)
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return 0, 0
    values = dict(zip(rows[0][1:], rows[1][1:], strict=False))
    return int(values.get("InDatagrams", 0)), int(values.get("RcvbufErrors", 0))


def socket_drops(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, dict[str, float]]:
    """Per namespace: UDP datagrams delivered and dropped because a socket's
    receive buffer was full during one test (the initiators' ESP-in-UDP
    sockets, the responder's port 4500), and the dropped share."""
    out: dict[str, dict[str, float]] = {}
    for name, (d1, e1) in after.items():
        d0, e0 = before.get(name, (0, 0))
        got, lost = d1 - d0, e1 - e0
        if got or lost:
            out[name] = {
                "datagrams": got,
                "rcvbuf_drops": lost,
                "drop_pct": round(100.0 * lost / (got + lost), 2) if got + lost else 0.0,
            }
    return out


def drops_note(drops: dict[str, dict[str, float]]) -> str:
    """``; s1 socket dropped 2.7 %`` for every namespace that dropped >= 0.5 %
    of its UDP datagrams (a TCP test through it is then loss-limited there)."""
    worst = [(n, d["drop_pct"]) for n, d in drops.items() if d["drop_pct"] >= 0.5]
    return "".join(f"; {n} socket dropped {pct:.1f} %" for n, pct in sorted(worst))


# --------------------------------------------------------------------------
# iperf3
# --------------------------------------------------------------------------


def parse_iperf(data: dict[str, Any], udp: bool) -> dict[str, float]:
    """Receiver-side figures from iperf3's client JSON."""
    end = data.get("end", {})
    if udp:
        s = end.get("sum") or {}
        rcv = end.get("sum_received") or {}
        seconds = float(s.get("seconds") or rcv.get("seconds") or 0) or 1.0
        packets = float(s.get("packets", 0))
        lost = float(s.get("lost_packets", 0))
        received = max(packets - lost, 0.0)
        return {
            "sent_pps": packets / seconds,
            "received_pps": received / seconds,
            "lost_pct": float(s.get("lost_percent", 0.0)),
        }
    rcv = end.get("sum_received") or {}
    snd = end.get("sum_sent") or {}
    return {
        "received_bps": float(rcv.get("bits_per_second", 0.0)),
        "retransmits": float(snd.get("retransmits", 0) or 0),
    }


# --------------------------------------------------------------------------
# the topology
# --------------------------------------------------------------------------


def _lab() -> Any:
    import deploy.lab as lab

    return lab


@dataclass
class SiteInfo:
    k: int
    gre: bool
    ns: Any = None
    charon: Any = None
    gre_proc: Any = None
    tunnel_id: str | None = None
    local_id: str | None = None
    psk: str | bytes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{'g' if self.gre else 's'}{self.k}"

    @property
    def lan(self) -> str:
        return f"10.{20 if self.gre else 10}.{self.k}.0/24"

    @property
    def lan_addr(self) -> str:
        return f"10.{20 if self.gre else 10}.{self.k}.1"

    @property
    def idx(self) -> int:
        return self.k - 1 + (8 if self.gre else 0)

    @property
    def wan_node(self) -> str:
        return f"198.51.100.{4 * self.idx + 1}"

    @property
    def wan_site(self) -> str:
        return f"198.51.100.{4 * self.idx + 2}"

    @property
    def our_side(self) -> str:
        return f"10.255.{1 if self.gre else 0}.{2 * (self.k - 1)}/31"

    @property
    def customer_side(self) -> str:
        return f"10.255.{1 if self.gre else 0}.{2 * (self.k - 1) + 1}/31"

    @property
    def port(self) -> int:
        return (GRE_BASE_PORT if self.gre else BASE_PORT) + self.k - 1


class Bench:
    """The topology and the configurations run on it."""

    def __init__(
        self, *, sites: int, run_dir: Path, log: Callable[[str], None], prefix: str = PREFIX
    ) -> None:
        from deploy.netns import Topology

        self.log = log
        self.run_dir = run_dir
        self.prefix = prefix
        self.topo = Topology(prefix)
        self.sites = [SiteInfo(k, False) for k in range(1, sites + 1)]
        self.gre_sites = [SiteInfo(k, True) for k in range(1, sites + 1)]
        self.servers: dict[str, subprocess.Popen[Any]] = {}
        self.control: subprocess.Popen[Any] | None = None
        self.workers: list[subprocess.Popen[Any]] = []
        self.api: Any = None
        self.responder: Any = None

    # -- build ------------------------------------------------------------
    def build(self) -> None:
        t = self.topo
        node = self.node = t.namespace("node")
        core = self.core = t.namespace("core")
        acct = self.acct = t.namespace(f"node-{ACCOUNT}")
        ctl = self.ctl = t.namespace("ctl")
        for ns in (node, core, acct):
            ns.enable_forwarding()
            ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
        node.addr("lo", f"{ANYCAST}/32")
        node.addr("lo", "10.200.0.1/32")  # strongSwan responder: an address in local_ts
        core.addr("lo", f"{CORE_ADDR}/32")
        t.veth(node, "core", core, "n", addr_a="10.201.1.2/30", addr_b="10.201.1.1/30")
        t.veth(acct, "core", core, "a", addr_a="10.201.2.2/30", addr_b="10.201.2.1/30")
        node.route(CORE_NET, via="10.201.1.1")
        acct.route(CORE_NET, via="10.201.2.1")
        t.veth(ctl, "mgmt", node, "mgmt", addr_a="10.99.0.1/24", addr_b="10.99.0.11/24")
        for s in [*self.sites, *self.gre_sites]:
            s.ns = t.namespace(s.name)
            t.veth(
                node,
                f"w{s.name}",
                s.ns,
                "wan",
                addr_a=f"{s.wan_node}/30",
                addr_b=f"{s.wan_site}/30",
            )
            s.ns.addr("lo", f"{s.lan_addr}/32")
            s.ns.route(f"{ANYCAST}/32", via=s.wan_node)
            node.route(s.lan, via=s.wan_site)
        self.route_core("node")
        for s in [*self.sites, *self.gre_sites]:
            self.servers[s.name] = core.popen(
                ["iperf3", "-s", "-B", CORE_ADDR, "-p", str(s.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.3)

    def restart_servers(self, sites: list[SiteInfo]) -> None:
        """A fresh iperf3 server for each site (by PID): one whose client
        vanished mid-test can stay busy and refuse the next test."""
        for s in sites:
            old = self.servers.get(s.name)
            if old is not None:
                self.topo.stop(old)
            self.servers[s.name] = self.core.popen(
                ["iperf3", "-s", "-B", CORE_ADDR, "-p", str(s.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.3)

    def route_core(self, via: str) -> None:
        """Return traffic to the sites: through ``node`` (plain, strongSwan)
        or through anywan's account namespace."""
        gw = "10.201.1.2" if via == "node" else "10.201.2.2"
        for p in ("10.10.0.0/16", "10.20.0.0/16", "10.255.0.0/16"):
            self.core.route(p, via=gw, replace=True)

    def plain_routes(self, on: bool) -> None:
        for s in [*self.sites, *self.gre_sites]:
            if on:
                s.ns.route(CORE_NET, via=s.wan_node, replace=True)
            else:
                with contextlib.suppress(Exception):
                    s.ns.ipr.route("del", dst=CORE_NET)

    def close(self) -> None:
        self.stop_anywan()
        self.topo.close()

    # -- strongSwan ----------------------------------------------------------
    def _charon(self, ns: Any, name: str) -> Any:
        from deploy.strongswan import Charon

        d = self.run_dir / name
        shutil.rmtree(d, ignore_errors=True)
        c = Charon(ns, d, name=name, log_levels={"ike": 1, "knl": 0, "net": 0})
        c.start()
        return c

    def _site_connection(self, s: SiteInfo, esp: str, *, anywan: bool) -> Any:
        from deploy.strongswan import Child, Connection

        return Connection(
            name="bench",
            local_addrs=s.wan_site,
            remote_addrs=ANYCAST,
            local_id=s.local_id if anywan else f"{s.name}.bench",
            remote_id="%any",
            psk=s.psk if anywan else self.sw_psk,
            children=(
                Child(
                    name="net",
                    local_ts=(s.lan,),
                    remote_ts=(CORE_NET,),
                    esp_proposals=(esp,),
                    extra={"replay_window": 0},
                ),
            ),
        )

    def start_sites(self, esp: str, *, anywan: bool) -> None:
        """Start every IPsec site's charon and bring its tunnel up."""
        for s in self.sites:
            s.charon = self._charon(s.ns, f"site-{s.name}")
            s.charon.load([self._site_connection(s, esp, anywan=anywan)])
        errors = []
        for s in self.sites:
            try:
                s.charon.initiate(child="net", timeout=15)
            except Exception as exc:
                errors.append(f"{s.name}: {str(exc)[-300:]}")
        if errors:
            raise SetupError("IKE failed: " + "; ".join(errors))

    def stop_sites(self) -> None:
        for s in self.sites:
            if s.charon is not None:
                s.charon.stop()
                s.charon = None

    def start_sw_responder(self, esp: str) -> None:
        from deploy.strongswan import Child, Connection

        self.sw_psk = secrets.token_hex(24)
        self.responder = self._charon(self.node, "responder")
        conns = [
            Connection(
                name=f"site{s.k}",
                local_addrs=ANYCAST,
                remote_addrs=s.wan_site,
                local_id="responder.bench",
                remote_id=f"{s.name}.bench",
                psk=self.sw_psk,
                children=(
                    Child(
                        name="net",
                        local_ts=(CORE_NET,),
                        remote_ts=(s.lan,),
                        esp_proposals=(esp,),
                        extra={"replay_window": 0},
                    ),
                ),
            )
            for s in self.sites
        ]
        self.responder.load(conns)

    def stop_sw_responder(self) -> None:
        if self.responder is not None:
            self.responder.stop()
            self.responder = None

    def sa_bytes(self) -> int:
        """Bytes out + in over every site's Child SAs (proof the traffic was
        encrypted, not routed in the clear)."""
        total = 0
        for s in self.sites:
            with contextlib.suppress(Exception):
                for ike in s.charon.list_sas():
                    for child in ike.get("child-sas", []):
                        total += int(child.get("bytes-in", 0)) + int(child.get("bytes-out", 0))
        return total

    # -- anywan ---------------------------------------------------------------
    def _control_argv(self, *args: str) -> list[str]:
        lab = _lab()
        return [
            *lab.entry_point("anywan-control", "control.cli"),
            "--config",
            str(lab.ANYWAN_CONFIG),
            "--state-dir",
            str(self.run_dir / "control"),
            "--id-suffix",
            ID_SUFFIX,
        ]

    def start_control(self) -> None:
        lab = _lab()
        for args in (["init"], ["keygen"], ["keygen", "--worker", "node"]):
            res = self.ctl.run([*self._control_argv(), *args], check=False, timeout=60)
            if res.returncode != 0:
                raise SetupError(f"anywan-control {' '.join(args)}: {res.stderr.strip()[-300:]}")
        res = self.ctl.run(
            [*self._control_argv(), "token", "create", "--operator", "--description", "bench"],
            check=False,
            timeout=60,
        )
        if res.returncode != 0:
            raise SetupError(f"anywan-control token create: {res.stderr.strip()[-300:]}")
        token = res.stdout.strip().splitlines()[-1]
        log = open(self.run_dir / "control.log", "wb")  # noqa: SIM115
        self.control = self.ctl.popen([*self._control_argv(), "serve"], stdout=log, stderr=log)
        log.close()
        url = "http://10.99.0.1:8080"
        if not lab.wait_until(
            lambda: lab.http_get(self.ctl.name, f"{url}/healthz", 1.0)[0] == 200, 30, 0.2
        ):
            raise SetupError("anywan-control serve: no /healthz in 30 s: " + self._tail("control"))
        self.api = lab.Api(self.ctl.name, url, token)
        base = f"/accounts/{ACCOUNT}/magic"
        for s in self.sites:
            t = self.api.call(
                "POST",
                f"{base}/ipsec_tunnels",
                {
                    "name": s.name,
                    "cloudflare_endpoint": ANYCAST,
                    "customer_endpoint": s.wan_site,
                    "interface_address": s.our_side,
                    "replay_protection": True,
                },
            )
            s.tunnel_id = t["id"]
            s.local_id = t["remote_identities"]["fqdn_id"]
            s.psk = self.api.call("POST", f"{base}/ipsec_tunnels/{s.tunnel_id}/psk_generate")["psk"]
        for s in self.gre_sites:
            t = self.api.call(
                "POST",
                f"{base}/gre_tunnels",
                {
                    "name": s.name,
                    "cloudflare_gre_endpoint": ANYCAST,
                    "customer_gre_endpoint": s.wan_site,
                    "interface_address": s.our_side,
                },
            )
            s.tunnel_id = t["id"]
        for s in [*self.sites, *self.gre_sites]:
            self.api.call(
                "POST",
                f"{base}/routes",
                {"prefix": s.lan, "nexthop": s.customer_side.split("/")[0], "description": s.name},
            )

    def _tail(self, name: str, n: int = 6) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(
                (self.run_dir / f"{name}.log").read_text(errors="replace").splitlines()[-n:]
            )
        return ""

    def _worker_argv(self, i: int, n: int) -> list[str]:
        lab = _lab()
        keys = self.run_dir / "control" / "keys"
        return [
            *lab.entry_point("anywan-worker", "dataplane.cli"),
            "--config",
            str(lab.ANYWAN_CONFIG),
            "--netns",
            self.node.name,
            "--anycast",
            ANYCAST,
            "--node",
            "node",
            "--index",
            str(i),
            "--workers",
            str(n),
            "--run-dir",
            str(self.run_dir / "node"),
            "--netns-template",
            self.acct.name.replace(ACCOUNT, "{account}"),
            "--metrics-port",
            str(9101 + i),
            "--bus-server-key",
            str(keys / "control.pub"),
            "--bus-client-key",
            str(keys / "workers" / "node.key"),
            "--log-level",
            "WARNING",
        ]

    def start_worker(self, i: int, n: int) -> subprocess.Popen[Any]:
        """Start worker ``i`` of ``n`` (from the root namespace; it enters
        ``node`` itself) and put it in slot ``i``."""
        log = open(self.run_dir / f"worker{i}.log", "ab")  # noqa: SIM115
        proc = self.topo.root.popen(self._worker_argv(i, n), stdout=log, stderr=log)
        log.close()
        while len(self.workers) <= i:
            self.workers.append(proc)
        self.workers[i] = proc
        return proc

    def worker_up(self, i: int) -> bool:
        lab = _lab()
        url = f"http://10.99.0.11:{9101 + i}/metrics"
        return bool(lab.http_get(self.ctl.name, url, 1.0)[0] == 200)

    def start_workers(self, n: int) -> None:
        lab = _lab()
        self.workers = []
        for i in range(n):
            self.start_worker(i, n)
        if not lab.wait_until(lambda: all(self.worker_up(i) for i in range(n)), 30, 0.3):
            dead = [i for i, p in enumerate(self.workers) if p.poll() is not None]
            raise SetupError(
                f"workers did not serve /metrics in 30 s (exited: {dead}): " + self._tail("worker0")
            )
        # the account's TUN and its routes come from the bus
        if not lab.wait_until(lambda: self._tun_routes_ready(), 20, 0.3):
            raise SetupError("worker did not install the TUN routes for the sites in 20 s")
        self.route_core("acct")

    def _tun_routes_ready(self) -> bool:
        res = self.acct.run(["ip", "-4", "route", "show", "dev", "aw0"], check=False, timeout=5)
        return res.returncode == 0 and all(s.lan in res.stdout for s in self.sites)

    def worker_packets(
        self, tunnel_id: str | None = None, direction: str | None = None
    ) -> list[float]:
        """Per worker: inner packets carried (``anywan_worker_tunnel_packets``;
        one tunnel or all; ``direction`` "in" or "out", or both), to show how
        the load was split. The workers flush their counters about once a
        second."""
        lab = _lab()
        out = []
        for i in range(len(self.workers)):
            _, body = lab.http_get(self.ctl.name, f"http://10.99.0.11:{9101 + i}/metrics", 2.0)
            match = {"tunnel": tunnel_id, "direction": direction}
            labels = {k: v for k, v in match.items() if v is not None}
            out.append(scrape.total(body, "anywan_worker_tunnel_packets_total", **labels))
        return out

    def stop_workers(self) -> None:
        for p in self.workers:
            self.topo.stop(p)
        self.workers = []
        self.route_core("node")

    def stop_anywan(self) -> None:
        self.stop_workers()
        if self.control is not None:
            self.topo.stop(self.control)
            self.control = None

    def start_gre_sites(self) -> None:
        for s in self.gre_sites:
            argv = [
                sys.executable,
                "-m",
                "deploy.gre_site",
                f"--local={s.wan_site}",
                f"--remote={ANYCAST}",
                f"--address={s.customer_side}",
                f"--route={CORE_NET}",
            ]
            s.gre_proc = s.ns.popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        for s in self.gre_sites:
            line = s.gre_proc.stdout.readline() if s.gre_proc.stdout else ""
            if "ready" not in line:
                raise SetupError(f"gre_site {s.name} did not start: {line.strip()[:200]}")

    def stop_gre_sites(self) -> None:
        for s in self.gre_sites:
            if s.gre_proc is not None:
                self.topo.stop(s.gre_proc)
                s.gre_proc = None

    # -- measuring --------------------------------------------------------------
    def pids(self, mode: str, gre: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        sites = self.gre_sites if gre else self.sites
        for s in sites:
            if gre and s.gre_proc is not None:
                out[f"gre_site {s.name}"] = s.gre_proc.pid
            if not gre and s.charon is not None and s.charon.proc is not None:
                out[f"charon {s.name} (initiator)"] = s.charon.proc.pid
        if self.responder is not None and self.responder.proc is not None:
            out["charon responder"] = self.responder.proc.pid
        for i, w in enumerate(self.workers):
            out[f"anywan-worker {i}"] = w.pid
        return out

    def iperf_once(
        self, sites: list[SiteInfo], test: str, seconds: float, pids: dict[str, int]
    ) -> dict[str, Any]:
        args, unit, _ = TESTS[test]
        udp = "-u" in args
        spaces = {s.name: s.ns for s in sites}
        spaces["node"] = self.node
        counters0 = {name: udp_counters(ns) for name, ns in spaces.items()}
        procs = []
        for s in sites:
            argv = [
                "iperf3",
                "-c",
                CORE_ADDR,
                "-B",
                s.lan_addr,
                "-p",
                str(s.port),
                "-t",
                str(seconds),
                "-J",
                "--connect-timeout",
                "3000",
                *args,
            ]
            procs.append(s.ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        watch = CpuWatch(
            {
                **pids,
                **{f"iperf3 client {s.name}": p.pid for s, p in zip(sites, procs, strict=True)},
                **{f"iperf3 server {s.name}": self.servers[s.name].pid for s in sites},
            }
        )
        watch.start()
        # sample just before the clients end (their /proc entries go with them)
        time.sleep(max(seconds - 0.25, 0.1))
        cpu = watch.stop()
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=seconds + 20)
            except subprocess.TimeoutExpired:
                self.topo.stop(p)
                out, err = b"", b"timeout"
            outs.append((out, err))
        drops = socket_drops(counters0, {name: udp_counters(ns) for name, ns in spaces.items()})
        total = 0.0
        detail = []
        for (out, err), s in zip(outs, sites, strict=True):
            try:
                data = json.loads(out)
            except ValueError:
                raise SetupError(f"iperf3 {s.name}: no JSON ({err.decode()[-200:]})") from None
            if "error" in data:
                raise SetupError(f"iperf3 {s.name}: {data['error']}")
            r = parse_iperf(data, udp)
            detail.append(r)
            total += r["received_pps"] / 1e3 if udp else r["received_bps"] / 1e9
        return {"value": total, "unit": unit, "per_site": detail, "cpu": cpu, "drops": drops}


def _summary(values: list[float]) -> dict[str, Any]:
    vs = sorted(values)
    return {
        "median": statistics.median(vs),
        "min": vs[0],
        "max": vs[-1],
        "reps": vs,
    }


# --------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    log: Callable[[str], None] = log_default,
    ciphers: list[str] | None = None,
    tests: list[str] | None = None,
    modes: list[str] | None = None,
    reps: int | None = None,
    seconds: float | None = None,
    sites: int = SITES,
) -> dict[str, Any]:
    """Run the throughput suite; returns {"rows": [...], "config": {...}, "notes": [...]}."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)", "rows": []}
    from deploy.netns import cleanup_prefix, unique_prefix

    ciphers = ciphers or (["aes256gcm", "gre"] if quick else list(CIPHERS))
    tests = tests or (["tcp-up", "udp64"] if quick else list(TESTS))
    modes = modes or ["plain", "strongswan", "anywan-1w", "anywan-2w"]
    reps = reps or (1 if quick else 3)
    seconds = seconds or (2.0 if quick else 5.0)
    prefix = unique_prefix(PREFIX)
    run_dir = Path(tempfile.mkdtemp(prefix="anywan-bench-tp-"))
    os.chmod(run_dir, 0o700)
    bench = Bench(sites=sites, run_dir=run_dir, log=log, prefix=prefix)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def measure(mode: str, cipher: str, gre: bool) -> None:
        group = bench.gre_sites if gre else bench.sites
        for test in tests:
            vals, cpus, splits, failed, drops = [], [], [], [], []
            bytes0 = bench.sa_bytes() if (not gre and mode != "plain") else 0
            counters0 = bench.worker_packets() if bench.workers else []
            for r in range(reps):
                t0 = time.monotonic()
                try:
                    res = bench.iperf_once(group, test, seconds, bench.pids(mode, gre))
                except SetupError as exc:
                    # one bad repetition (an iperf3 server left busy, a timeout on
                    # a loaded machine) is recorded, not fatal for the row
                    failed.append(str(exc)[-200:])
                    log(f"  {mode:<10} {cipher:<17} {test:<8} rep {r + 1}/{reps}: failed: {exc}")
                    bench.restart_servers(group)
                    continue
                vals.append(res["value"])
                cpus.append(res["cpu"])
                drops.append(res["drops"])
                if bench.workers:
                    splits.append(bench.worker_packets())
                log(
                    f"  {mode:<10} {cipher:<17} {test:<8} rep {r + 1}/{reps}: "
                    f"{res['value']:.3f} {res['unit']}  "
                    f"[{limiter(res['cpu'])}{drops_note(res['drops'])}] "
                    f"({time.monotonic() - t0:.1f}s)"
                )
            if not vals:
                raise SetupError(f"all {reps} repetitions of {test} failed: {failed[-1]}")
            mid = sorted(range(len(vals)), key=lambda i: vals[i])[len(vals) // 2]
            row = {
                "suite": "throughput",
                "mode": mode,
                "cipher": cipher,
                "test": test,
                "unit": TESTS[test][1],
                **_summary(vals),
                "cpu": cpus[mid],
                "limit": limiter(cpus[mid]) + drops_note(drops[mid]),
                "socket_drops": drops[mid],
            }
            per_core = [
                v / (c / 100)
                for v, c in zip(vals, (responder_cpu(x) for x in cpus), strict=True)
                if c > 1.0
            ]
            if mode != "plain" and per_core:
                row["per_core"] = _summary(per_core)
                row["responder_cpu_pct"] = responder_cpu(cpus[mid])
            if not gre and mode != "plain":
                row["sa_bytes"] = bench.sa_bytes() - bytes0
                if row["sa_bytes"] <= 0:
                    row["status"] = "invalid: no bytes on the site's Child SAs"
            if splits:
                # inner packets each worker carried during this test's repetitions
                row["worker_packet_counters"] = [
                    b - a for a, b in zip(counters0, splits[-1], strict=False)
                ]
            if failed:
                row["failed_reps"] = failed
            rows.append(row)

    def not_run(mode: str, cipher: str, reason: str) -> None:
        log(f"  {mode} {cipher}: not run: {reason}")
        done = {r["test"] for r in rows if r["mode"] == mode and r["cipher"] == cipher}
        for test in tests:
            if test in done:
                continue
            rows.append(
                {
                    "suite": "throughput",
                    "mode": mode,
                    "cipher": cipher,
                    "test": test,
                    "unit": TESTS[test][1],
                    "status": f"not run: {reason}",
                }
            )

    try:
        t0 = time.monotonic()
        bench.build()
        log(f"  topology built in {time.monotonic() - t0:.1f}s ({sites} sites)")
        if "plain" in modes:
            bench.plain_routes(True)
            try:
                measure("plain", "none", gre=False)
            finally:
                bench.plain_routes(False)
        ipsec = [c for c in ciphers if CIPHERS[c][1] is not None]
        if "strongswan" in modes:
            for c in ipsec:
                esp = CIPHERS[c][1]
                assert esp is not None
                try:
                    bench.start_sw_responder(esp)
                    bench.start_sites(esp, anywan=False)
                    measure("strongswan", c, gre=False)
                except Exception as exc:
                    not_run("strongswan", c, str(exc)[-300:])
                finally:
                    bench.stop_sites()
                    bench.stop_sw_responder()
        aw_modes = [m for m in modes if m.startswith("anywan-")]
        if aw_modes:
            try:
                bench.start_control()
            except Exception as exc:
                for m in aw_modes:
                    for c in ciphers:
                        not_run(m, c, f"anywan control: {str(exc)[-300:]}")
                aw_modes = []
            for m in aw_modes:
                n = int(m.split("-")[1].rstrip("w"))
                try:
                    bench.start_workers(n)
                except Exception as exc:
                    for c in ciphers:
                        not_run(m, c, str(exc)[-300:])
                    bench.stop_workers()
                    continue
                for c in ciphers:
                    esp = CIPHERS[c][1]
                    try:
                        if esp is None:
                            bench.start_gre_sites()
                            measure(m, c, gre=True)
                        else:
                            bench.start_sites(esp, anywan=True)
                            measure(m, c, gre=False)
                    except Exception as exc:
                        not_run(m, c, str(exc)[-300:])
                    finally:
                        bench.stop_sites()
                        bench.stop_gre_sites()
                bench.stop_workers()
    finally:
        bench.close()
        cleanup_prefix(prefix)
        shutil.rmtree(run_dir, ignore_errors=True)
    add_ratios(rows)
    return {
        "rows": rows,
        "config": {
            "sites": sites,
            "reps": reps,
            "seconds": seconds,
            "ciphers": ciphers,
            "tests": tests,
            "modes": modes,
        },
        "notes": notes,
    }


def anchor_mode(row: dict[str, Any]) -> str:
    """strongSwan for IPsec rows; plain routing for GRE, and for the
    strongSwan rows themselves (the machine's ceiling)."""
    if row["cipher"] == "gre" or row["mode"] == "strongswan":
        return "plain"
    return "strongswan"


def add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {
        (r["mode"], r["cipher"] if r["mode"] != "plain" else "none", r["test"]): r
        for r in rows
        if "median" in r and "status" not in r
    }
    for r in rows:
        if r["mode"] == "plain" or "median" not in r:
            continue
        am = anchor_mode(r)
        a = index.get((am, "none" if am == "plain" else r["cipher"], r["test"]))
        if a and a["median"] > 0:
            r["anchor"] = am
            r["anchor_median"] = a["median"]
            r["ratio"] = r["median"] / a["median"]
            if am == "strongswan" and "per_core" in r and "per_core" in a:
                r["per_core_ratio"] = r["per_core"]["median"] / a["per_core"]["median"]
        if r["mode"] == "anywan-2w":
            one = index.get(("anywan-1w", r["cipher"], r["test"]))
            if one and one["median"] > 0:
                r["ratio_vs_1w"] = r["median"] / one["median"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cipher", action="append", choices=sorted(CIPHERS))
    ap.add_argument("--test", action="append", choices=sorted(TESTS))
    ap.add_argument(
        "--mode", action="append", choices=["plain", "strongswan", "anywan-1w", "anywan-2w"]
    )
    ap.add_argument("--reps", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--sites", type=int, default=SITES)
    args = ap.parse_args(argv)
    res = run(
        quick=args.quick,
        ciphers=args.cipher,
        tests=args.test,
        modes=args.mode,
        reps=args.reps,
        seconds=args.seconds,
        sites=args.sites,
    )
    emit(res, args.json)
    return 0


def iter_rows(res: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from res.get("rows", [])


if __name__ == "__main__":
    sys.exit(main())
