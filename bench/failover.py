"""Failover and rekey loss: ``python -m bench.failover [--quick] [--json out.json]`` (root).

Uses the topology of :mod:`bench.throughput` (netns ``awb-fo-<pid>-``) with two
anywan workers on the node.

* **Worker failover**: a probe sends UDP datagrams at ``RATE`` per second from a
  site's LAN address through its tunnel to an echo server in the core and
  counts the echoes. About 2 s in, the worker that sent most of the
  tunnel's packets toward the site in the last second (from the workers'
  ``/metrics``; with replay protection the SA's owner) is SIGKILLed; the
  probe keeps going on the other worker. The outage is the longest run of
  probes with no echo, times the probe interval (so the resolution is
  ``1000 / RATE`` ms), and the largest gap between two echoes as a
  cross-check. The killed worker is restarted before the next repetition.
  Run for an IPsec tunnel (strongSwan kernel-libipsec initiator, ESP in UDP,
  AES-256-GCM, replay protection on, so the killed worker is the outbound
  SA's owner, DESIGN §5) and for a GRE tunnel (deploy/gre_site.py).
* **Rekey under load**: an iperf3 TCP stream and the probe share one tunnel;
  the site (strongSwan) rekeys its Child SA (``swanctl --rekey``,
  make-before-break on our side); lost probes around the rekey. Measured with
  anywan (2 workers) as the responder and, as the same-run anchor, with a
  strongSwan kernel-libipsec responder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import emit
from bench import throughput as tp

RATE = 1000
ECHO_PORT = 7999
_PKT = struct.Struct("!QQ")  # sequence, send time (ns)


# --------------------------------------------------------------------------
# probe: echo server and client (run inside namespaces as subprocesses)
# --------------------------------------------------------------------------


def echo_server(addr: str, port: int, seconds: float) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], 0.5)
        if r:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)


def probe(bind: str, dst: str, port: int, rate: int, seconds: float) -> dict[str, Any]:
    """Send ``rate`` datagrams/s for ``seconds``, collect echoes; summary."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((bind, 0))
    s.setblocking(False)
    interval = 1.0 / rate
    n = int(rate * seconds)
    got: dict[int, float] = {}
    t0 = time.monotonic()
    seq = 0
    while True:
        now = time.monotonic()
        while seq < n and now >= t0 + seq * interval:
            # no route while a tunnel is down: counted as lost
            with contextlib.suppress(OSError):
                s.sendto(_PKT.pack(seq, time.monotonic_ns()), (dst, port))
            seq += 1
        if seq >= n and now > t0 + seconds + 0.5:
            break
        timeout = max(0.0, min(t0 + seq * interval - now, 0.01)) if seq < n else 0.05
        r, _, _ = select.select([s], [], [], timeout)
        if r:
            while True:
                try:
                    data = s.recv(64)
                except BlockingIOError:
                    break
                if len(data) >= _PKT.size:
                    k, _ = _PKT.unpack_from(data)
                    got.setdefault(k, time.monotonic() - t0)
    return summarize(n, got, interval)


def summarize(sent: int, got: dict[int, float], interval: float) -> dict[str, Any]:
    """Loss runs by sequence (outage = longest run x interval) and the largest
    arrival gap, from the first echo to the last."""
    longest, run, run_start, at = 0, 0, 0, None
    first = min(got) if got else sent
    for k in range(first, sent):
        if k in got:
            run = 0
        else:
            if run == 0:
                run_start = k
            run += 1
            if run > longest:
                longest, at = run, run_start
    arrivals = sorted(got.values())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "sent": sent,
        "received": len(got),
        "lost": sent - len(got),
        "outage_ms": round(longest * interval * 1000, 1),
        "outage_at_s": round(at * interval, 3) if at is not None else None,
        "max_echo_gap_ms": round(max(gaps, default=0.0) * 1000, 1),
        "interval_ms": interval * 1000,
        "lost_seqs": [k for k in range(sent) if k not in got][:20000],
    }


# --------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.failover", *args]


ROOT = str(Path(__file__).resolve().parent.parent)


def start_probe(site: tp.SiteInfo, seconds: float) -> subprocess.Popen[Any]:
    return site.ns.popen(
        _py("--probe", site.lan_addr, tp.CORE_ADDR, str(ECHO_PORT), str(RATE), str(seconds)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )


def read_probe(proc: subprocess.Popen[Any], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return dict(json.loads(out))
    except ValueError:
        raise tp.SetupError(f"probe failed: {err.decode()[-300:]}") from None


def failover_reps(
    bench: tp.Bench,
    site: tp.SiteInfo,
    reps: int,
    log: Callable[[str], None],
    seconds: float = 5.0,
) -> list[dict[str, Any]]:
    out = []
    n = len(bench.workers)
    for r in range(reps):
        t0 = time.monotonic()
        proc = start_probe(site, seconds)
        time.sleep(1.0)
        # The worker that *sends* the tunnel's packets (core -> site): with
        # replay protection the SA's owner, which the replies are steered to;
        # the other may still receive the site's half (SO_REUSEPORT), and
        # killing that one alone costs next to nothing.
        p0 = bench.worker_packets(site.tunnel_id, "out")
        time.sleep(1.2)
        p1 = bench.worker_packets(site.tunnel_id, "out")
        deltas = [b - a for a, b in zip(p0, p1, strict=True)]
        victim = max(range(n), key=lambda i: deltas[i])
        pid = bench.workers[victim].pid
        killed_at = time.monotonic() - t0
        os.kill(pid, signal.SIGKILL)
        bench.workers[victim].wait(5)
        res = read_probe(proc, 15)
        res.pop("lost_seqs")
        res.update(
            {"killed_worker": victim, "killed_at_s": round(killed_at, 2), "worker_deltas": deltas}
        )
        out.append(res)
        log(
            f"  failover {'gre' if site.gre else 'ipsec'} rep {r + 1}/{reps}: "
            f"killed worker {victim} (packets it sent in the 1.2 s before: {deltas}) -> outage "
            f"{res['outage_ms']} ms, lost {res['lost']}/{res['sent']} "
            f"({time.monotonic() - t0:.1f}s)"
        )
        bench.start_worker(victim, n)
        if not tp._lab().wait_until(lambda v=victim: bench.worker_up(v), 30, 0.2):
            raise tp.SetupError(
                f"worker {victim} did not come back: " + bench._tail(f"worker{victim}")
            )
        time.sleep(1.0)
    return out


def rekey_reps(
    bench: tp.Bench, reps: int, seconds: float, log: Callable[[str], None], mode: str
) -> list[dict[str, Any]]:
    site = bench.sites[0]
    out = []
    for r in range(reps):
        t0 = time.monotonic()
        load = site.ns.popen(
            [
                "iperf3",
                "-c",
                tp.CORE_ADDR,
                "-B",
                site.lan_addr,
                "-p",
                str(site.port),
                "-t",
                str(seconds + 1),
                "-J",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc = start_probe(site, seconds)
        spis0 = _child_spis(site)
        holds0 = _hold_timeouts(bench)
        time.sleep(seconds / 2)
        t_rekey = time.monotonic() - t0
        site.charon.rekey(child="net")
        res = read_probe(proc, seconds + 15)
        # loss in the 1.6 s after the rekey request, minus the loss in the
        # 1.6 s before it (what the load alone costs)
        lost = res.pop("lost_seqs")
        k = int(t_rekey * RATE)
        w = int(1.6 * RATE)
        after = sum(1 for x in lost if k - 100 <= x < k - 100 + w)
        before = sum(1 for x in lost if k - 100 - w <= x < k - 100)
        res.update(
            {
                "lost_after_rekey": after,
                "lost_before_rekey": before,
                "rekey_lost": max(after - before, 0),
                "rekey_at_s": round(t_rekey, 2),
            }
        )
        try:
            lout, _ = load.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            # keep the probe's figures (they say whether the tunnel stalled)
            load.kill()
            load.communicate()
            lout = b""
            res["load_error"] = f"iperf3 load did not finish within {seconds + 20:.0f} s"
        try:
            gbps = tp.parse_iperf(json.loads(lout), False)["received_bps"] / 1e9
        except (ValueError, KeyError):
            gbps = None
        spis1 = _child_spis(site)
        res.update({"load_gbps": gbps, "rekeyed": bool(spis1) and spis1 != spis0})
        if holds0 is not None:
            # IKE answers sent before every worker had applied the new SA
            res["answer_hold_timeouts"] = int((_hold_timeouts(bench) or 0) - holds0)
        out.append(res)
        log(
            f"  rekey {mode} rep {r + 1}/{reps}: lost {res['lost']}/{res['sent']} "
            f"({res['lost_before_rekey']} in 1.6 s before, {res['lost_after_rekey']} after), "
            f"outage "
            f"{res['outage_ms']} ms, load {gbps and round(gbps, 3)} Gbit/s, "
            f"rekeyed={res['rekeyed']}"
            + (
                f", answer hold timeouts {res['answer_hold_timeouts']}"
                if "answer_hold_timeouts" in res
                else ""
            )
            + f" ({time.monotonic() - t0:.1f}s)"
            + (f" [{res['load_error']}]" if "load_error" in res else "")
        )
    return out


def _hold_timeouts(bench: tp.Bench) -> float | None:
    """anywan control's answer-hold timeouts so far (None: strongSwan mode)."""
    if bench.api is None or bench.control is None:
        return None
    try:
        return bench.api.metric("anywan_control_ike_answer_hold_timeouts_total")
    except Exception:
        return None


def _child_spis(site: tp.SiteInfo) -> set[str]:
    spis = set()
    try:
        for ike in site.charon.list_sas():
            for child in ike.get("child-sas", []):
                if child.get("state") == "INSTALLED":
                    spis.add(str(child.get("spi-in")))
    except Exception:
        pass
    return spis


def _row(name: str, kind: str, mode: str, reps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = sorted(float(r[key]) for r in reps)
    return {
        "suite": "failover",
        "test": name,
        "cipher": kind,
        "mode": mode,
        "unit": "ms" if key.endswith("_ms") else "packets",
        "metric": key,
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "reps": vals,
        "detail": reps,
    }


def run(
    *,
    quick: bool = False,
    log: Callable[[str], None] = tp.log_default,
    reps: int | None = None,
    rekeys: int | None = None,
) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)", "rows": []}
    from deploy.netns import cleanup_prefix, unique_prefix

    reps = reps or (2 if quick else 10)
    rekey_n = rekeys or (1 if quick else 5)
    rekey_s = 3.0 if quick else 6.0
    probe_s = 3.5 if quick else 5.0  # the kill comes ~2.2 s in
    prefix = unique_prefix(tp.PREFIX.replace("tp-", "fo-"))
    run_dir = Path(tempfile.mkdtemp(prefix="anywan-bench-fo-"))
    os.chmod(run_dir, 0o700)
    bench = tp.Bench(sites=1, run_dir=run_dir, log=log, prefix=prefix)
    rows: list[dict[str, Any]] = []

    def not_run(test: str, kind: str, mode: str, why: str) -> None:
        log(f"  {test} {kind} {mode}: not run: {why}")
        rows.append(
            {
                "suite": "failover",
                "test": test,
                "cipher": kind,
                "mode": mode,
                "unit": "ms",
                "status": f"not run: {why}",
            }
        )

    try:
        bench.build()
        for ns in (bench.core,):
            echo = ns.popen(
                _py("--echo", tp.CORE_ADDR, str(ECHO_PORT), "36000"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
        esp = tp.CIPHERS["aes256gcm"][1]
        assert esp is not None
        # anchor for rekey loss: strongSwan responder
        try:
            bench.start_sw_responder(esp)
            bench.start_sites(esp, anywan=False)
            res = rekey_reps(bench, rekey_n, rekey_s, log, "strongswan")
            rows.append(_row("rekey-loss", "aes256gcm", "strongswan", res, "rekey_lost"))
        except Exception as exc:
            not_run("rekey-loss", "aes256gcm", "strongswan", str(exc)[-300:])
        finally:
            bench.stop_sites()
            bench.stop_sw_responder()
        try:
            bench.start_control()
            bench.start_workers(2)
        except Exception as exc:
            for t in ("worker-kill", "rekey-loss"):
                not_run(t, "aes256gcm", "anywan-2w", str(exc)[-300:])
            not_run("worker-kill", "gre", "anywan-2w", str(exc)[-300:])
            return {"rows": rows}
        try:
            bench.start_sites(esp, anywan=True)
            try:
                res = failover_reps(bench, bench.sites[0], reps, log, probe_s)
                rows.append(_row("worker-kill", "aes256gcm", "anywan-2w", res, "outage_ms"))
            except Exception as exc:
                not_run("worker-kill", "aes256gcm", "anywan-2w", str(exc)[-300:])
            try:
                res = rekey_reps(bench, rekey_n, rekey_s, log, "anywan-2w")
                rows.append(_row("rekey-loss", "aes256gcm", "anywan-2w", res, "rekey_lost"))
            except Exception as exc:
                not_run("rekey-loss", "aes256gcm", "anywan-2w", str(exc)[-300:])
        except Exception as exc:
            for test in ("worker-kill", "rekey-loss"):
                not_run(test, "aes256gcm", "anywan-2w", str(exc)[-300:])
        finally:
            bench.stop_sites()
        try:
            bench.start_gre_sites()
            res = failover_reps(bench, bench.gre_sites[0], reps, log, probe_s)
            rows.append(_row("worker-kill", "gre", "anywan-2w", res, "outage_ms"))
        except Exception as exc:
            not_run("worker-kill", "gre", "anywan-2w", str(exc)[-300:])
        finally:
            bench.stop_gre_sites()
        bench.topo.stop(echo)
    finally:
        bench.close()
        cleanup_prefix(prefix)
        shutil.rmtree(run_dir, ignore_errors=True)
    for r in rows:
        if r.get("test") == "rekey-loss" and r.get("mode") == "anywan-2w":
            anchor = next(
                (x for x in rows if x.get("test") == "rekey-loss" and x["mode"] == "strongswan"),
                None,
            )
            if anchor and "median" in anchor:
                r["anchor"] = "strongswan"
                r["anchor_median"] = anchor["median"]
                if anchor["median"] > 0:
                    r["ratio"] = r["median"] / anchor["median"]
    return {
        "rows": rows,
        "config": {"rate_pps": RATE, "reps": reps, "rekey_reps": rekey_n, "rekey_s": rekey_s},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--echo"]:
        echo_server(argv[1], int(argv[2]), float(argv[3]))
        return 0
    if argv[:1] == ["--probe"]:
        print(json.dumps(probe(argv[1], argv[2], int(argv[3]), int(argv[4]), float(argv[5]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, help="worker kills per tunnel (10; --quick 2)")
    ap.add_argument(
        "--rekeys",
        type=int,
        help="Child SA rekeys per responder (5; --quick 1); anywan's come after the kills, "
        "so --reps 10 --rekeys 20 also checks that rekeys work after many worker restarts",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res = run(quick=args.quick, reps=args.reps, rekeys=args.rekeys)
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
