"""Per-stage CPU profile of ONE anywan worker carrying real traffic.

    python -m bench.profile [--quick] [--json PATH] [--cipher NAME] [--test NAME]
    (root; Linux ``perf``; netns prefix ``awb-pf-``)

The topology, initiators, iperf3 clients and servers are those of
:mod:`bench.throughput` (two strongSwan kernel-libipsec sites, ESP in UDP
4500, one ``anywan-worker`` process as responder, the account's TUN in its
own namespace, the core behind it). While iperf3 runs, ``perf record -e
cpu-clock -g`` samples the worker process; every sample of the worker's
packet-loop thread is put in one stage by its kernel call chain and, for
user-mode samples, by the shared object it was in:

=============== ================================================================
stage           a sample is in it when
=============== ================================================================
tun_write       the kernel stack holds ``tun_chr_write_iter`` (the TUN write
                syscall, *including* what the kernel does with the inner
                packet inside it: forwarding to the core, and the core's TCP
                receive when the softirq runs on the way out of the syscall)
tun_read        ``tun_chr_read_iter``
socket_recv     a recvmsg/recvfrom syscall (UDP 4500, raw ESP/GRE sockets)
socket_send     a sendmsg/sendto syscall (incl. UDP GSO segmentation and
                the outer packet's path through veth)
epoll           ``epoll_wait`` itself (CPU, not the time slept)
kernel_other    any other kernel work on the thread (page faults, softirqs
                that interrupted user mode, other syscalls)
crypto          user mode inside cryptography's ``_rust`` module, which has
                OpenSSL linked in (AES-GCM, AES-CBC, HMAC and the binding)
python          user mode anywhere else: the interpreter running the loop,
                memoryview/bytes work, libc
=============== ================================================================

Why a sampling profile with ``perf`` and not timers in the worker or
py-spy: (1) it measures the unmodified worker (nothing to turn on, no cost
when off, no timer calls distorting a ~10 µs packet); (2) it counts CPU time,
not wall time — on a 2-core machine shared with the initiators and iperf3 a
timer around a syscall also counts the time the worker was preempted;
(3) it sees *inside* the syscalls: whether a TUN write is expensive because
of the TUN or because the kernel forwards the inner packet and runs the
receiving TCP stack in the same call is exactly what py-spy (Python and
native user frames only) cannot show. The cost is that Python-level detail
is coarse (Python 3.11 has no perf trampoline): "python" is one stage, with
its hottest interpreter symbols listed. The other threads of the worker (bus,
relay, /metrics) are reported as one separate figure.

Per test and direction the result holds: the stages' share of the loop
thread's samples (they sum to 100 %), the loop thread's CPU (% of one core;
100 % minus that is time asleep in epoll), the worker's packet rate from its
``/metrics`` counters (inbound = decrypted, outbound = encrypted), ns of CPU
per packet per stage, what the kernel did inside the TUN write and the socket
syscalls (nearest enclosing marker function: inner TCP receive, UDP
delivery, forwarding, veth, copies), and the hottest symbols per stage.
``tcp-up`` (site → core) is the *decrypt* path (the worker also encrypts the
ACKs going back), ``tcp-down`` the *encrypt* path.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import throughput as tp
from deploy import scrape

PREFIX = os.environ.get("ANYWAN_BENCH_NETNS_PREFIX", "awb-") + "pf-"
STAGES = (
    "tun_write",
    "tun_read",
    "socket_recv",
    "socket_send",
    "epoll",
    "kernel_other",
    "crypto",
    "python",
)
STAGE_LABELS = {
    "tun_write": "TUN write (syscall + kernel work on the inner packet)",
    "tun_read": "TUN read",
    "socket_recv": "socket receive (recvmsg)",
    "socket_send": "socket send (sendmsg/sendto, GSO)",
    "epoll": "epoll_wait (CPU)",
    "kernel_other": "other kernel (faults, softirq, other syscalls)",
    "crypto": "crypto (cryptography/OpenSSL)",
    "python": "Python (interpreter, loop, parsing, copies)",
}
TEST_DIRECTION = {
    "tcp-up": "decrypt (site→core)",
    "tcp-down": "encrypt (core→site)",
    "udp1400": "decrypt, UDP 1400 B",
    "udp64": "decrypt, UDP 64 B",
}
PERIOD_NS = 500_000
"""cpu-clock sampling period: one sample per 0.5 ms of CPU (2 kHz)."""

# Kernel functions that decide the stage (any frame of the kernel stack).
_SYSCALL_MARKERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("tun_write", frozenset({"tun_chr_write_iter", "tun_get_user"})),
    ("tun_read", frozenset({"tun_chr_read_iter", "tun_do_read"})),
    (
        "socket_recv",
        frozenset(
            {
                "__sys_recvmsg",
                "___sys_recvmsg",
                "__x64_sys_recvmsg",
                "__sys_recvfrom",
                "__x64_sys_recvfrom",
                "sock_recvmsg",
            }
        ),
    ),
    (
        "socket_send",
        frozenset(
            {
                "__sys_sendmsg",
                "___sys_sendmsg",
                "__x64_sys_sendmsg",
                "__sys_sendto",
                "__x64_sys_sendto",
                "sock_sendmsg",
                "__sock_sendmsg",
            }
        ),
    ),
    ("epoll", frozenset({"do_epoll_wait", "__x64_sys_epoll_wait", "ep_poll"})),
)
# What the kernel was doing inside a syscall: the nearest enclosing marker
# (walking from the sampled function toward the syscall entry).
_DETAIL_MARKERS: dict[str, str] = {
    "tcp_v4_rcv": "inner TCP receive (core's socket)",
    "tcp_v6_rcv": "inner TCP receive (core's socket)",
    "tcp_ack": "inner TCP receive (core's socket)",
    "__udp4_lib_rcv": "UDP delivery to a socket",
    "udp_queue_rcv_skb": "UDP delivery to a socket",
    "udp_recvmsg": "UDP recvmsg (copy out, GRO list)",
    "raw_recvmsg": "raw recvmsg",
    "ip_forward": "IP forwarding",
    "ip_forward_finish": "IP forwarding",
    "veth_xmit": "veth transmit",
    "__udp_gso_segment": "UDP GSO segmentation",
    "udp4_ufo_fragment": "UDP GSO segmentation",
    "ip_rcv": "IP receive",
    "__netif_receive_skb_core": "netif receive",
    "_copy_from_iter": "copy from user",
    "_copy_to_iter": "copy to user",
    "copy_user_enhanced_fast_string": "copy user",
    "rep_movs_alternative": "copy user",
    "tun_build_skb": "TUN skb build",
    "tun_alloc_skb": "TUN skb build",
    "__alloc_skb": "skb alloc",
    "kfree_skb_reason": "skb free",
    "consume_skb": "skb free",
    "nf_hook_slow": "netfilter",
    "fib_table_lookup": "route lookup",
}


def log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# perf script parsing and classification (pure: unit-testable)
# --------------------------------------------------------------------------


def parse_perf_script(text: str) -> list[tuple[int, list[tuple[str, str]]]]:
    """``perf script -F tid,ip,sym,dso`` output (with call chains) →
    [(tid, [(symbol, dso), ... leaf first])]."""
    samples: list[tuple[int, list[tuple[str, str]]]] = []
    tid: int | None = None
    frames: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip():
            if tid is not None:
                samples.append((tid, frames))
            tid, frames = None, []
            continue
        if not line.startswith("\t"):
            if tid is not None:
                samples.append((tid, frames))
            frames = []
            head = line.split()
            try:
                tid = int(head[0])
            except (IndexError, ValueError):
                tid = None
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        rest = parts[1]
        dso = ""
        if rest.endswith(")") and " (" in rest:
            rest, dso = rest.rsplit(" (", 1)
            dso = dso[:-1]
        sym = rest.split("+0x", 1)[0].strip()
        frames.append((sym, dso))
    if tid is not None:
        samples.append((tid, frames))
    return samples


def classify(frames: list[tuple[str, str]]) -> tuple[str, str, str]:
    """(stage, detail, leaf symbol) of one sample (frames leaf first)."""
    if not frames:
        return "python", "", "?"
    kernel = [s for s, d in frames if d.startswith("[kernel")]
    leaf_sym, leaf_dso = frames[0]
    if kernel and frames[0][1].startswith("[kernel"):
        names = set(kernel)
        stage = "kernel_other"
        for name, markers in _SYSCALL_MARKERS:
            if names & markers:
                stage = name
                break
        detail = "other"
        for s in kernel:
            d = _DETAIL_MARKERS.get(s)
            if d is not None:
                detail = d
                break
        return stage, detail, leaf_sym
    base = os.path.basename(leaf_dso)
    if "_rust" in base or "libcrypto" in base or "libssl" in base:
        return "crypto", base, leaf_sym
    return "python", base, leaf_sym


def summarize(
    samples: list[tuple[int, list[tuple[str, str]]]], main_tid: int, period_ns: int = PERIOD_NS
) -> dict[str, Any]:
    """Stage shares of the main thread's samples, details and top symbols."""
    stages: collections.Counter[str] = collections.Counter()
    details: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    symbols: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    other_threads = 0
    for tid, frames in samples:
        if tid != main_tid:
            other_threads += 1
            continue
        stage, detail, sym = classify(frames)
        stages[stage] += 1
        details[stage][detail] += 1
        symbols[stage][sym] += 1
    total = sum(stages.values())
    out: dict[str, Any] = {
        "samples": total,
        "other_thread_samples": other_threads,
        "cpu_ns": total * period_ns,
        "stages": {},
    }
    for st in STAGES:
        n = stages.get(st, 0)
        entry: dict[str, Any] = {
            "samples": n,
            "pct": 100.0 * n / total if total else 0.0,
        }
        if n:
            entry["top_symbols"] = [
                [s, round(100.0 * c / n, 1)] for s, c in symbols[st].most_common(6)
            ]
            if st in ("tun_write", "tun_read", "socket_recv", "socket_send"):
                entry["detail"] = [
                    [d, round(100.0 * c / n, 1)] for d, c in details[st].most_common(8)
                ]
        out["stages"][st] = entry
    return out


# --------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------


def _worker_counters(bench: tp.Bench) -> dict[str, float]:
    """Sum of ``anywan_worker_tunnel_packets_total`` per direction (worker 0)."""
    lab = tp._lab()
    _, body = lab.http_get(bench.ctl.name, "http://10.99.0.11:9101/metrics", 2.0)
    return {
        d: scrape.total(body, "anywan_worker_tunnel_packets_total", direction=d)
        for d in ("in", "out")
    }


def _perf_argv(pid: int, out: Path, seconds: float) -> list[str]:
    return [
        "perf",
        "record",
        "-q",
        "-e",
        "cpu-clock",
        "-c",
        str(PERIOD_NS),
        "-g",
        "-p",
        str(pid),
        "-o",
        str(out),
        "--",
        "sleep",
        f"{seconds:.2f}",
    ]


def _py_spy_start(
    pid: int, window: float, out: Path, wanted: bool
) -> tuple[subprocess.Popen[Any] | None, Path]:
    """py-spy (optional, ``--py-spy``) over the same window: which Python
    lines the loop thread spends its samples on (a line calling a syscall or
    the cipher counts that call too)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not wanted or not os.path.exists(exe):
        return None, out
    argv = [exe, "record", "--pid", str(pid), "--duration", str(max(int(window), 1))]
    argv += ["--rate", "400", "--gil", "--format", "raw", "--nonblocking", "-o", str(out)]
    err = open(out.with_suffix(".err"), "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(argv, stdout=err, stderr=err), out
    finally:
        err.close()


def _py_spy_finish(proc: subprocess.Popen[Any] | None, out: Path) -> list[list[Any]] | None:
    if proc is None:
        return None
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(timeout=5)
        return None
    if not out.exists():
        with contextlib.suppress(OSError):
            print(out.with_suffix(".err").read_text()[-500:], file=sys.stderr)
    return leaf_lines(out.read_text() if out.exists() else "")


def leaf_lines(raw: str, top: int = 20) -> list[list[Any]]:
    """py-spy ``--format raw`` (collapsed stacks) → [[leaf frame, % of samples]]
    for the packet-loop thread (stacks through ``Worker.run``)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if not any(
            "worker.py" in f and f.split(" (")[0].endswith(".run") for f in stack.split(";")
        ):
            continue
        counts[stack.split(";")[-1].strip()] += int(n)
    total = sum(counts.values())
    return [[f, round(100.0 * c / total, 1)] for f, c in counts.most_common(top)] if total else []


SYSCALLS = (
    "recvmsg",
    "recvfrom",
    "read",
    "readv",
    "write",
    "writev",
    "sendmsg",
    "sendto",
    "epoll_wait",
)


def _stat_argv(pid: int, seconds: float) -> list[str]:
    events = ",".join(f"syscalls:sys_enter_{c}" for c in SYSCALLS)
    return [
        "perf",
        "stat",
        "-x",
        ",",
        "-e",
        events,
        "-p",
        str(pid),
        "--",
        "sleep",
        f"{seconds:.2f}",
    ]


def parse_perf_stat(text: str) -> dict[str, int]:
    """``perf stat -x ,`` lines → {syscall: count} (per process, all threads)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) < 3 or "sys_enter_" not in f[2]:
            continue
        with contextlib.suppress(ValueError):
            out[f[2].rsplit("sys_enter_", 1)[1]] = int(f[0])
    return out


def profile_once(
    bench: tp.Bench,
    test: str,
    seconds: float,
    run_dir: Path,
    log: Callable[[str], None],
    py_spy: bool = False,
) -> dict[str, Any]:
    """One iperf3 test through the worker with perf sampling its middle."""
    worker = bench.workers[0]
    result: dict[str, Any] = {}
    error: list[BaseException] = []

    def traffic() -> None:
        try:
            result.update(bench.iperf_once(bench.sites, test, seconds, bench.pids("anywan", False)))
        except BaseException as exc:  # reported below
            error.append(exc)

    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    lead = min(1.0, seconds * 0.2)
    window = max(seconds - 2 * lead, 0.5)
    time.sleep(lead)
    data = run_dir / f"perf-{test}.data"
    c0, t0 = _worker_counters(bench), time.monotonic()
    cpu0 = tp._threads(worker.pid)
    spy, spy_out = _py_spy_start(worker.pid, window, run_dir / f"py-spy-{test}.txt", py_spy)
    perf = subprocess.Popen(
        _perf_argv(worker.pid, data, window),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stat = subprocess.Popen(
        _stat_argv(worker.pid, window),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, perr = perf.communicate(timeout=window + 30)
        _, serr = stat.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        bench.topo.stop(perf)
        bench.topo.stop(stat)
        raise tp.SetupError("perf record did not end") from None
    syscalls = parse_perf_stat(serr)
    cpu1 = tp._threads(worker.pid)
    c1, t1 = _worker_counters(bench), time.monotonic()
    lines = _py_spy_finish(spy, spy_out)
    th.join(seconds + 40)
    if error:
        raise error[0]
    if perf.returncode != 0 or not data.exists():
        raise tp.SetupError(f"perf record failed: {perr.decode(errors='replace')[-300:]}")
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    samples = parse_perf_script(script.stdout)
    data.unlink(missing_ok=True)
    summary = summarize(samples, worker.pid)
    dt = max(t1 - t0, 1e-6)
    loop_ticks = cpu1.get(worker.pid, 0) - cpu0.get(worker.pid, 0)
    packets_in = c1["in"] - c0["in"]
    packets_out = c1["out"] - c0["out"]
    packets = packets_in + packets_out
    pkt_rate = packets / dt
    loop_cpu = 100.0 * loop_ticks / tp.CLK_TCK / dt
    for entry in summary["stages"].values():
        # CPU ns per packet carried (both directions) in this stage
        share = entry["pct"] / 100.0
        entry["ns_per_packet"] = (
            round(share * (summary["cpu_ns"] / window) / pkt_rate) if pkt_rate > 0 else None
        )
    log(
        f"  profile {test:<8}: {result.get('value', 0):.3f} {result.get('unit', '')}, "
        f"worker {pkt_rate / 1e3:.1f} kpps (in {packets_in / dt / 1e3:.1f}, "
        f"out {packets_out / dt / 1e3:.1f}), loop thread {loop_cpu:.0f}% CPU, "
        f"{summary['samples']} samples: "
        + ", ".join(f"{k} {v['pct']:.0f}%" for k, v in summary["stages"].items() if v["pct"] >= 0.5)
    )
    return {
        "test": test,
        "direction": TEST_DIRECTION.get(test, test),
        "value": result.get("value"),
        "unit": result.get("unit"),
        "window_s": round(window, 2),
        "kpps_in": round(packets_in / dt / 1e3, 2),
        "kpps_out": round(packets_out / dt / 1e3, 2),
        "kpps": round(pkt_rate / 1e3, 2),
        "loop_thread_cpu_pct": round(loop_cpu, 1),
        "machine": result.get("cpu", {}).get("machine_busy_pct"),
        **summary,
        "syscalls_per_packet": {
            k: round(v / window / pkt_rate, 3) if pkt_rate > 0 else None
            for k, v in syscalls.items()
        },
        **({"python_lines": lines} if lines is not None else {}),
    }


def run(
    *,
    quick: bool = False,
    log: Callable[[str], None] = log_default,
    ciphers: list[str] | None = None,
    tests: list[str] | None = None,
    seconds: float | None = None,
    reps: int | None = None,
    py_spy: bool = False,
) -> dict[str, Any]:
    """The profile suite: {"rows": [...], "config": {...}} (or {"skipped": ...})."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces, perf)", "rows": []}
    if shutil.which("perf") is None:
        return {"skipped": "needs Linux perf (Debian package linux-perf)", "rows": []}
    from deploy.netns import cleanup_prefix, unique_prefix

    ciphers = ciphers or ["aes256gcm"]
    tests = tests or (["tcp-up", "tcp-down"] if quick else ["tcp-up", "tcp-down", "udp64"])
    seconds = seconds or (3.0 if quick else 8.0)
    reps = reps or 1
    prefix = unique_prefix(PREFIX)
    run_dir = Path(tempfile.mkdtemp(prefix="anywan-bench-pf-"))
    os.chmod(run_dir, 0o700)
    bench = tp.Bench(sites=tp.SITES, run_dir=run_dir, log=log, prefix=prefix)
    rows: list[dict[str, Any]] = []
    try:
        bench.build()
        bench.start_control()
        bench.start_workers(1)
        for c in ciphers:
            esp = tp.CIPHERS[c][1]
            try:
                if esp is None:
                    bench.start_gre_sites()
                    group_gre = True
                else:
                    bench.start_sites(esp, anywan=True)
                    group_gre = False
                for test in tests:
                    for r in range(reps):
                        try:
                            if group_gre:
                                saved = bench.sites
                                bench.sites = bench.gre_sites
                                try:
                                    row = profile_once(bench, test, seconds, run_dir, log, py_spy)
                                finally:
                                    bench.sites = saved
                            else:
                                row = profile_once(bench, test, seconds, run_dir, log, py_spy)
                        except tp.SetupError as exc:
                            log(f"  profile {c} {test} rep {r + 1}: failed: {exc}")
                            rows.append(
                                {
                                    "cipher": c,
                                    "test": test,
                                    "rep": r + 1,
                                    "status": f"failed: {str(exc)[-300:]}",
                                }
                            )
                            bench.restart_servers(bench.gre_sites if group_gre else bench.sites)
                            continue
                        rows.append({"cipher": c, "rep": r + 1, **row})
            finally:
                bench.stop_sites()
                bench.stop_gre_sites()
    finally:
        bench.close()
        cleanup_prefix(prefix)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "suite": "profile",
        "rows": rows,
        "config": {
            "ciphers": ciphers,
            "tests": tests,
            "seconds": seconds,
            "reps": reps,
            "sites": tp.SITES,
            "period_ns": PERIOD_NS,
            "py_spy": py_spy,
        },
    }


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def _fmt_pct(x: float) -> str:
    return f"{x:.1f} %"


def markdown(result: dict[str, Any]) -> list[str]:
    """The markdown lines of the profile section of ``results.md``."""
    lines = ["## Per-stage profile of one worker (`bench.profile`)", ""]
    if result.get("skipped"):
        return [*lines, f"Skipped: {result['skipped']}.", ""]
    rows = [r for r in result.get("rows", []) if "stages" in r]
    failed = [r for r in result.get("rows", []) if "status" in r]
    cfg = result.get("config", {})
    lines += [
        f"One anywan worker as the responder of {cfg.get('sites', 2)} strongSwan "
        "kernel-libipsec sites (the `bench.throughput` topology), iperf3 through it, "
        f"`perf record -e cpu-clock -g` on the worker for the middle of each "
        f"{cfg.get('seconds', '?')} s test. Each cell: share of the packet-loop "
        "thread's CPU samples, and CPU ns per packet the worker carried (both "
        "directions). The TUN write includes the kernel's work on the inner packet "
        "inside that syscall (forwarding, and the receiving TCP stack when its softirq "
        "runs there).",
        "",
    ]
    if not rows:
        lines.append("No profile rows.")
        for r in failed:
            lines.append(f"- {r.get('cipher')} {r.get('test')}: {r['status']}")
        return [*lines, ""]
    heads = [f"{tp.CIPHERS.get(r['cipher'], (r['cipher'],))[0]} {r['direction']}" for r in rows]
    lines.append("| stage | " + " | ".join(heads) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for st in STAGES:
        cells = []
        for r in rows:
            e = r["stages"].get(st, {})
            ns = e.get("ns_per_packet")
            cells.append(f"{_fmt_pct(e.get('pct', 0.0))}" + (f" ({ns} ns)" if ns else ""))
        lines.append(f"| {STAGE_LABELS[st]} | " + " | ".join(cells) + " |")
    lines.append(
        "| **throughput** | "
        + " | ".join(f"{r.get('value') or 0:.3g} {r.get('unit') or ''}" for r in rows)
        + " |"
    )
    lines.append(
        "| worker kpps in / out | "
        + " | ".join(f"{r['kpps_in']:.1f} / {r['kpps_out']:.1f}" for r in rows)
        + " |"
    )
    lines.append(
        "| loop thread CPU (% of a core) | "
        + " | ".join(f"{r['loop_thread_cpu_pct']:.0f} %" for r in rows)
        + " |"
    )
    lines.append(
        "| machine busy | " + " | ".join(f"{r.get('machine') or 0:.0f} %" for r in rows) + " |"
    )
    lines.append("")
    for r in rows:
        parts = []
        for st in ("tun_write", "socket_recv", "socket_send"):
            e = r["stages"].get(st, {})
            if e.get("detail"):
                parts.append(f"{st}: " + ", ".join(f"{d} {p:.0f} %" for d, p in e["detail"][:4]))
        py = r["stages"].get("python", {}).get("top_symbols", [])
        if py:
            parts.append("python top: " + ", ".join(f"{s} {p:.0f} %" for s, p in py[:4]))
        lines.append(
            f"- {tp.CIPHERS.get(r['cipher'], (r['cipher'],))[0]} {r['direction']}: "
            + "; ".join(parts)
        )
    for r in failed:
        lines.append(f"- {r.get('cipher')} {r.get('test')}: {r['status']}")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cipher", action="append", choices=sorted(tp.CIPHERS))
    ap.add_argument("--test", action="append", choices=sorted(tp.TESTS))
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--markdown", action="store_true", help="print the markdown section")
    ap.add_argument(
        "--py-spy", action="store_true", help="also sample Python lines with py-spy (if installed)"
    )
    args = ap.parse_args(argv)
    res = run(
        quick=args.quick,
        ciphers=args.cipher,
        tests=args.test,
        seconds=args.seconds,
        reps=args.reps,
        py_spy=args.py_spy,
    )
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    if args.markdown or not args.json:
        print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
