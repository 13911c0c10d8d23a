"""IKEv2 benchmark: our initiator drives our responder in memory, one core.

    python -m bench.ike [--quick] [--reps R] [--fuzz N] [--strongswan N] [--json out.json]

Reports, per DH group (ECP-384, MODP-2048):

* handshakes/s for IKE_SA_INIT + IKE_AUTH (with the first Child SA) — the whole
  pair, and the responder alone (CPU time spent inside its ``receive_datagram``);
  CPU time (``time.thread_time``), so a busy shared machine does not skew it;
* p50/p99 latency of one handshake (pair, in memory, so no network; wall
  clock, so time the process was preempted on a shared machine shows in p99);
* memory per established IKE SA (with its Child SA) in the responder, at 1 000
  tunnels (and 10 000 without ``--quick``), measured as RSS growth and, in
  another process, as Python-heap growth (tracemalloc; excludes OpenSSL's own
  allocations; not in the same process, as tracing inflates RSS).

Every measurement is repeated (``--reps``; default 3, 2 with ``--quick``; the
groups interleaved within each repetition, memory in a fresh process each
time). Each number in the JSON is the median over the repetitions, and
``spread[key]`` holds its ``min``, ``max`` and ``values``.

``--strongswan N`` (root; namespaces ``$ANYWAN_BENCH_NETNS_PREFIX`` (default
``awb-``) + ``ike-*``): the same initiator does N handshakes over UDP against
Debian's strongSwan responder and against ours,
each alone in a namespace, started fresh for each of the ``--reps``
repetitions (strongSwan and ours alternating, so drift hits both alike);
responder CPU time and RSS growth come from /proc. ``--memory-sas M`` adds,
per repetition, M ECP-384 handshakes against a fresh responder of each kind:
RSS growth per IKE SA at M SAs (the full run uses 10 000).

``--fuzz N`` runs the mutation fuzzer of tests/control/ike for at least N
mutated messages (the soak target; CI runs a few thousand).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from control.ike.engine import IkeConfig, IkeEngine, PeerIdentity, TunnelAuth
from control.ike.events import ChildSaInstalled
from control.ike.proposals import CHILD_SUITES_NO_PFS, IkeSuite
from replication.records import TrafficSelector

SERVER = ("203.0.113.1", 500)
SUITES = {
    "ecp384": IkeSuite(20, 128, None, 5, 20),  # aes128gcm16-prfsha256-ecp384
    "modp2048": IkeSuite(20, 128, None, 5, 14),  # aes128gcm16-prfsha256-modp2048
}
PSK = b"benchmark pre-shared key 0123456789"


def tunnel(i: int, local: str) -> TunnelAuth:
    return TunnelAuth(
        account_id="bench",
        tunnel_id=f"{i:032x}",
        psk=PSK,
        local_addr=local,
        local_ts=(TrafficSelector.from_network("10.0.0.0/8"),),
        remote_ts=(TrafficSelector.from_network("192.168.0.0/16"),),
    )


def client_tunnel(i: int, local: str) -> TunnelAuth:
    """The initiator's view: its own side first."""
    t = tunnel(i, local)
    return TunnelAuth(
        account_id=t.account_id,
        tunnel_id=t.tunnel_id,
        psk=PSK,
        local_addr=local,
        local_ts=t.remote_ts,
        remote_ts=t.local_ts,
    )


class Bench:
    def __init__(self, n_tunnels: int) -> None:
        self.tunnels = {f"{i:032x}": tunnel(i, SERVER[0]) for i in range(n_tunnels)}
        cfg = IkeConfig(dpd_interval=1e9, child_lifetime=1e9, ike_lifetime=1e9)
        self.server = IkeEngine(cfg, self.lookup)
        self.client = IkeEngine(IkeConfig(dpd_interval=1e9), lambda ident: None)
        self.server_time = 0.0
        self.children = 0

    def lookup(self, ident: PeerIdentity) -> TunnelAuth | None:
        t = self.tunnels.get(ident.tunnel_id or "")
        return t if t is not None and t.account_id == ident.account_id else None

    def handshake(self, i: int, suite: IkeSuite, port: int) -> None:
        client_t = client_tunnel(i, "198.51.100.7")
        local = (f"198.51.{(port >> 8) & 0xFF}.{port & 0xFF}", 500)
        self.client.initiate(
            client_t,
            local=local,
            remote=SERVER,
            now=0.0,
            ike_suites=[suite],
            child_suites=[CHILD_SUITES_NO_PFS[0]],
            initial_contact=False,
        )
        for _ in range(4):
            out = self.client.datagrams_to_send()
            if not out:
                break
            for data, src, dst in out:
                t0 = time.thread_time()
                self.server.receive_datagram(data, dst, src, 0.0)
                self.server_time += time.thread_time() - t0
            for data, src, dst in self.server.datagrams_to_send():
                self.client.receive_datagram(data, dst, src, 0.0)
        # drain events; forget the client side so only the responder keeps state
        while (e := self.server.next_event()) is not None:
            self.children += isinstance(e, ChildSaInstalled)
        while self.client.next_event() is not None:
            pass
        self.client.sas.clear()
        self.client.by_tunnel.clear()
        self.client.spis_in_use.clear()


def repeated(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One result from repeated runs: each of ``keys`` is the median over the
    runs (so readers of a single-run result still work), and ``spread[key]``
    holds its min, max and every value; ``repetitions`` is the count."""
    row: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["repetitions"] = len(runs)
    row["spread"] = {
        k: {
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
            "values": [r[k] for r in runs],
        }
        for k in keys
    }
    return row


RATE_KEYS = (
    "pair_handshakes_per_s",
    "pair_handshakes_per_s_wall",
    "responder_handshakes_per_s",
    "responder_ms_per_handshake",
    "p50_ms",
    "p99_ms",
)
MEMORY_KEYS = ("rss_bytes_per_sa", "python_heap_bytes_per_sa")
VS_KEYS = (
    "wall_s",
    "p50_ms",
    "p99_ms",
    "responder_cpu_s",
    "responder_handshakes_per_cpu_s",
    "handshakes_per_s_wall",
    "responder_rss_growth_per_sa",
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_rate(name: str, suite: IkeSuite, n: int) -> dict[str, Any]:
    b = Bench(n)
    lat: list[float] = []
    for i in range(min(50, n)):  # warm-up
        b.handshake(i, suite, i)
    b.server.sas.clear()
    b.server.by_tunnel.clear()
    b.server_time = 0.0
    b.children = 0
    t_start = time.perf_counter()
    cpu_start = time.thread_time()
    for i in range(n):
        t0 = time.perf_counter()
        b.handshake(i, suite, i)
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    cpu = time.thread_time() - cpu_start
    established = sum(1 for sa in b.server.sas.values() if sa.state.value == "established")
    assert established == n, f"only {established}/{n} handshakes completed"
    assert b.children == n, f"only {b.children}/{n} Child SAs installed"
    lat.sort()
    return {
        "group": name,
        "handshakes": n,
        "pair_handshakes_per_s": n / cpu,
        "pair_handshakes_per_s_wall": n / wall,
        "responder_handshakes_per_s": n / b.server_time,
        "responder_ms_per_handshake": 1000 * b.server_time / n,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


def bench_memory(n: int, heap: bool = False) -> dict[str, Any]:
    """Growth per IKE SA while the responder establishes ``n`` more: RSS (no
    tracing), or with ``heap`` the Python heap by tracemalloc — in a
    separate process, because tracemalloc's own bookkeeping (a trace per
    live allocation) is itself RSS: traced, the RSS growth per SA reads
    about four times too high."""
    suite = SUITES["ecp384"]
    b = Bench(n)
    for i in range(20):
        b.handshake(i, suite, i)  # warm caches, imports
    b.server.sas.clear()
    b.server.by_tunnel.clear()
    gc.collect()
    if heap:
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
    rss0 = rss_bytes()
    for i in range(n):
        b.handshake(i, suite, i)
    gc.collect()
    rss1 = rss_bytes()
    assert len(b.server.ike_sas()) == n
    if not heap:
        return {"ike_sas": n, "rss_bytes_per_sa": (rss1 - rss0) / n}
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    return {"ike_sas": n, "python_heap_bytes_per_sa": growth / n}


def run_fuzz(target: int) -> dict[str, Any]:
    sys.path.insert(0, os.getcwd())
    from tests.control.ike.fuzzing import fuzz_run

    total = 0
    seed = 0
    t0 = time.perf_counter()
    while total < target:
        sent, pair = fuzz_run(seed)
        assert not pair.server.sas and not pair.server.spis_in_use, f"seed {seed} left state"
        total += sent
        seed += 1
    return {"mutated_messages": total, "runs": seed, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------- vs strongSwan

SS_PREFIX = os.environ.get("ANYWAN_BENCH_NETNS_PREFIX", "awb-") + "ike-"
SITE_IP, GW_IP = "10.99.0.2", "10.99.0.1"
SS_PROPOSALS = {
    "ecp384": "aes128gcm16-prfsha256-ecp384",
    "modp2048": "aes128gcm16-prfsha256-modp2048",
}


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """(user+system CPU seconds, RSS bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def drive(n: int, group: str) -> dict[str, Any]:
    """Our initiator over a real UDP socket (run inside the site namespace)."""
    import socket

    from control.ike.events import NegotiationFailed

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((SITE_IP, 500))
    sock.settimeout(3.0)
    eng = IkeEngine(IkeConfig(dpd_interval=1e9, retransmit_timeout=2.0), lambda i: None)
    lat: list[float] = []
    failed = 0
    t_start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        eng.initiate(
            client_tunnel(i, SITE_IP),
            local=(SITE_IP, 500),
            remote=(GW_IP, 500),
            now=time.monotonic(),
            ike_suites=[SUITES[group]],
            child_suites=[CHILD_SUITES_NO_PFS[0]],
            initial_contact=False,
        )
        done = False
        while not done:
            for data, _, remote in eng.datagrams_to_send():
                sock.sendto(data, remote)
            try:
                data, addr = sock.recvfrom(65535)
            except TimeoutError:
                failed += 1
                break
            eng.receive_datagram(data, (SITE_IP, 500), addr, time.monotonic())
            while (e := eng.next_event()) is not None:
                if isinstance(e, ChildSaInstalled):
                    done = True
                elif isinstance(e, NegotiationFailed):
                    failed += 1
                    done = True
        lat.append(time.perf_counter() - t0)
        eng.sas.clear()
        eng.by_tunnel.clear()
        eng.spis_in_use.clear()
    wall = time.perf_counter() - t_start
    lat.sort()
    return {
        "handshakes": n,
        "failed": failed,
        "wall_s": wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
    }


def serve() -> None:
    """Our responder over a real UDP socket (run inside the gw namespace)."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((GW_IP, 500))

    def lookup(ident: PeerIdentity) -> TunnelAuth | None:
        i = int(ident.tunnel_id or "0", 16)
        return tunnel(i, GW_IP)

    eng = IkeEngine(IkeConfig(dpd_interval=1e9, child_lifetime=1e9, ike_lifetime=1e9), lookup)
    while True:
        data, addr = sock.recvfrom(65535)
        eng.receive_datagram(data, (GW_IP, 500), addr, time.monotonic())
        for out, _, remote in eng.datagrams_to_send():
            sock.sendto(out, remote)
        while eng.next_event() is not None:
            pass


def _one_responder_run(
    topo: Any, site: Any, gw: Any, group: str, responder: str, n: int
) -> dict[str, Any]:
    """A fresh responder (strongSwan's charon or ours) in the gw namespace, the
    initiator driving ``n`` handshakes at it from the site namespace; the
    responder's CPU time and RSS growth from /proc; the responder is stopped
    afterwards whatever happens."""
    from deploy.strongswan import Charon, Child, Connection

    quiet = {k: 0 for k in ("default", "ike", "cfg", "knl", "net", "enc", "esp")}
    py = [sys.executable, "-m", "bench.ike"]
    charon = None
    server = None
    try:
        if responder == "strongswan":
            charon = Charon(gw, name=f"bench-{group}", log_levels=quiet)
            charon.start()
            charon.load(
                [
                    Connection(
                        name="bench",
                        local_addrs=GW_IP,
                        remote_addrs="%any",
                        local_id=GW_IP,
                        remote_id="%any",
                        psk=PSK,
                        proposals=[SS_PROPOSALS[group]],
                        children=[
                            Child(
                                local_ts=["10.0.0.0/8"],
                                remote_ts=["192.168.0.0/16"],
                                esp_proposals=["aes128gcm16"],
                            )
                        ],
                        encap=False,
                    )
                ]
            )
            assert charon.proc is not None
            pid = charon.proc.pid
        else:
            server = gw.popen([*py, "--serve"], cwd=os.getcwd())
            pid = server.pid
            time.sleep(1.0)
        cpu0, rss0 = proc_cpu_rss(pid)
        res = site.run([*py, "--drive", str(n), "--group", group], timeout=600)
        cpu1, rss1 = proc_cpu_rss(pid)
    finally:
        if charon is not None:
            charon.stop()
        if server is not None:
            topo.stop(server)
    r: dict[str, Any] = json.loads(res.stdout)
    r.update(
        group=group,
        responder=responder,
        responder_cpu_s=cpu1 - cpu0,
        responder_handshakes_per_cpu_s=(n - r["failed"]) / max(cpu1 - cpu0, 1e-9),
        handshakes_per_s_wall=(n - r["failed"]) / r["wall_s"],
        responder_rss_growth_per_sa=(rss1 - rss0) / n,
    )
    return r


def bench_vs_strongswan(n: int, reps: int = 3, memory_sas: int = 0) -> dict[str, Any]:
    """The same initiator against a strongSwan responder and against ours, one
    group after the other, ``reps`` times, in two namespaces over a veth; a
    fresh responder per run; the responders' CPU time and RSS come from /proc.
    ``vs_strongswan``: one row per (group, responder), medians over the
    repetitions, with ``spread`` (see :func:`repeated`). With ``memory_sas``,
    also ``memory_vs_strongswan``: RSS growth per IKE SA of each responder
    after ``memory_sas`` ECP-384 handshakes (once per repetition)."""
    from deploy.netns import Topology, cleanup_prefix

    cleanup_prefix(SS_PREFIX)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    mem: dict[str, list[dict[str, Any]]] = {}
    with Topology(SS_PREFIX) as topo:
        site, gw = topo.namespace("site"), topo.namespace("gw")
        topo.veth(site, "s0", gw, "g0", addr_a=f"{SITE_IP}/24", addr_b=f"{GW_IP}/24")
        for rep in range(reps):
            for group in SUITES:
                for responder in ("strongswan", "anywan"):
                    r = _one_responder_run(topo, site, gw, group, responder, n)
                    runs.setdefault((group, responder), []).append(r)
                    print(
                        f"[{rep + 1}/{reps}] {group:9s} {responder:10s} "
                        f"{r['handshakes_per_s_wall']:6.0f}/s wall  "
                        f"responder CPU {1000 * r['responder_cpu_s'] / n:.2f} ms/handshake "
                        f"({r['responder_handshakes_per_cpu_s']:.0f}/CPU-s)  "
                        f"p99 {r['p99_ms']:.1f} ms  "
                        f"RSS +{r['responder_rss_growth_per_sa'] / 1024:.1f} KiB/SA  "
                        f"failed {r['failed']}",
                        flush=True,
                    )
            for responder in ("strongswan", "anywan") if memory_sas else ():
                r = _one_responder_run(topo, site, gw, "ecp384", responder, memory_sas)
                mem.setdefault(responder, []).append(r)
                print(
                    f"[{rep + 1}/{reps}] memory at {memory_sas} IKE SAs, {responder:10s} "
                    f"RSS +{r['responder_rss_growth_per_sa'] / 1024:.1f} KiB/SA  "
                    f"failed {r['failed']}",
                    flush=True,
                )
    out: dict[str, Any] = {"vs_strongswan": []}
    for (group, responder), rs in runs.items():
        row = repeated(rs, VS_KEYS)
        row.update(
            group=group,
            responder=responder,
            handshakes=n,
            failed=sum(r["failed"] for r in rs),
        )
        out["vs_strongswan"].append(row)
    if mem:
        out["memory_vs_strongswan"] = [
            {
                "group": "ecp384",
                "responder": responder,
                "ike_sas": memory_sas,
                "failed": sum(r["failed"] for r in rs),
                **repeated(rs, ("responder_rss_growth_per_sa", "handshakes_per_s_wall")),
            }
            for responder, rs in mem.items()
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (CI smoke)")
    ap.add_argument("--fuzz", type=int, default=0, metavar="N", help="fuzz N mutated messages")
    ap.add_argument("--json", help="write results here")
    ap.add_argument(
        "--reps", type=int, help="repetitions of every measurement (default 3, --quick 2)"
    )
    ap.add_argument(
        "--strongswan",
        type=int,
        default=0,
        metavar="N",
        help="N handshakes over UDP in netns against strongSwan's responder and ours",
    )
    ap.add_argument(
        "--memory-sas",
        type=int,
        default=0,
        metavar="N",
        help="with --strongswan: also RSS growth per IKE SA of both responders at N SAs",
    )
    ap.add_argument("--memory", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--heap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--drive", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--group", default="ecp384", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory:
        print(json.dumps(bench_memory(args.memory, args.heap)))
        return 0
    if args.drive:
        print(json.dumps(drive(args.drive, args.group)))
        return 0
    if args.serve:
        serve()
        return 0
    reps = args.reps or (2 if args.quick else 3)
    if args.strongswan:
        vs: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        vs["reps"] = reps
        vs.update(bench_vs_strongswan(args.strongswan, reps, args.memory_sas))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(vs, f, indent=2)
        return 0
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
    }
    if args.fuzz:
        results["fuzz"] = run_fuzz(args.fuzz)
        print(json.dumps(results["fuzz"]))
    else:
        n = 150 if args.quick else 1000
        results["reps"] = reps
        rate_runs: dict[str, list[dict[str, Any]]] = {}
        for rep in range(reps):
            for name, suite in SUITES.items():
                r = bench_rate(name, suite, n)
                rate_runs.setdefault(name, []).append(r)
                print(
                    f"[{rep + 1}/{reps}] {name:9s} pair {r['pair_handshakes_per_s']:7.0f}/s  "
                    f"responder {r['responder_handshakes_per_s']:7.0f}/s "
                    f"({r['responder_ms_per_handshake']:.2f} ms)  "
                    f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms"
                )
        results["rates"] = [
            {"group": name, "handshakes": n, **repeated(rs, RATE_KEYS)}
            for name, rs in rate_runs.items()
        ]
        mem_runs: dict[int, list[dict[str, Any]]] = {}
        sizes = (1000,) if args.quick else (1000, 10000)
        for rep in range(reps):
            for n_sa in sizes:
                # a fresh process each time (RSS growth is meaningless after other
                # runs), RSS and Python heap separately (see bench_memory)
                m: dict[str, Any] = {}
                for extra in ([], ["--heap"]):
                    proc = subprocess.run(
                        [sys.executable, "-m", "bench.ike", "--memory", str(n_sa), *extra],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    m.update(json.loads(proc.stdout))
                mem_runs.setdefault(n_sa, []).append(m)
                print(
                    f"[{rep + 1}/{reps}] memory at {n_sa:6d} IKE SAs: "
                    f"{m['rss_bytes_per_sa'] / 1024:.1f} KiB RSS/SA, "
                    f"{m['python_heap_bytes_per_sa'] / 1024:.1f} KiB Python heap/SA"
                )
        results["memory"] = [
            {"ike_sas": n_sa, **repeated(ms, MEMORY_KEYS)} for n_sa, ms in mem_runs.items()
        ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
