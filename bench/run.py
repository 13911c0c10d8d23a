"""Every benchmark suite in one command, with results you can compare.

    python -m bench.run [--quick] [--only SUITE,...] [--results-dir DIR]

Suites (in this order; ``--only`` picks some):

========== ==================================================== =====================
suite      what                                                 same-run anchor
========== ==================================================== =====================
codec      ESP/GRE codec ns/packet (``bench.codec``)             bare AESGCM.encrypt
worker     the worker's packet path from memory, 1 and 2         bare codec call; one
           processes (``bench.worker``); full run: two real      process
           workers back to back through the kernel (--network)
profile    per-stage CPU profile (TUN, crypto, socket, Python)   share of the loop
           of one worker carrying iperf3 from strongSwan sites   thread's samples; ns
           (``bench.profile``; root, Linux ``perf``)             per packet carried
pktrate    end-to-end kpps / Gbit/s of real worker processes     1 worker (2w ÷ 1w);
           fed by a cheap GSO / TPACKET generator, encap and     the 150 kpps goal
           decap, 64 / 1400 B, GCM, CBC+SHA256, GRE, 1 and 2
           workers (``bench.pktrate``; root)
ike        handshakes/s, p50/p99, memory per IKE SA at 1k/10k    strongSwan responder,
           (``bench.ike``; and ``--strongswan``: one initiator    same initiator
           against strongSwan's responder and ours over UDP)
replication bus propagation p50/p99 to N subscribers; SA         N = 1 / 1k SAs
           propagation IKE_AUTH → usable on N = 1, 4, 16
           workers; snapshot time (``bench.replication``)
throughput tunnel TCP Gbit/s and UDP pps through strongSwan's   strongSwan libipsec;
           kernel-libipsec responder and anywan (1, 2 workers)   plain routing (GRE)
           (``bench.throughput``)
failover   outage when the worker carrying a flow is SIGKILLed;  strongSwan (rekey)
           loss around a Child SA rekey under load
           (``bench.failover``)
========== ==================================================== =====================

Each suite runs as a subprocess (a crash or hang in one does not lose the
others: it is recorded as failed, with its last output lines). Progress goes
to stderr: one line per step with the elapsed time.

Output: ``bench/results/<UTC timestamp>/`` with ``results.json`` (machine
facts — CPU model, cores, kernel, load average before/after, Python and
package versions, git commit — the exact command, and each suite's raw
output), ``results.md`` (tables: every number with its same-run anchor as a
ratio, median and min–max over the repetitions) and PNG plots
(:mod:`bench.plot`); ``bench/results/latest`` points at it.

``--quick`` runs every suite for a few seconds (CI runs it; no thresholds).
The pktrate, throughput, failover and profile suites need root (network namespaces);
without root they are recorded as skipped. The ike suite repeats every
measurement (3 times, 2 with ``--quick``) and codec interleaves 7 rounds (3),
so their tables show median (min–max) too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
ORDER = ("codec", "worker", "profile", "pktrate", "ike", "replication", "throughput", "failover")


@dataclass
class Step:
    name: str
    argv: list[str]
    #: "stdout": the JSON is the process's stdout; "file": it is written to
    #: the path substituted for ``{json}`` in argv.
    output: str
    timeout: float


def steps_for(suite: str, quick: bool) -> list[Step]:
    py = [sys.executable, "-m"]
    q = ["--quick"] if quick else []
    long = 600.0 if quick else 3600.0
    if suite == "codec":
        return [Step("codec", [*py, "bench.codec", *q, "--json"], "stdout", long)]
    if suite == "worker":
        steps = [
            Step("worker", [*py, "bench.worker", *q, "--workers", "2", "--json"], "stdout", long)
        ]
        if not quick and os.geteuid() == 0:
            steps.append(
                Step(
                    "worker-network",
                    [*py, "bench.worker", "--network", "--seconds", "5"],
                    "jsonlines",
                    long,
                )
            )
        return steps
    if suite == "pktrate":
        return [Step("pktrate", [*py, "bench.pktrate", *q, "--json", "{json}"], "file", long)]
    if suite == "profile":
        if not (HERE / "profile.py").exists():
            # recorded, not failed: this tree has no bench/profile.py
            why = {"skipped": "not available: bench/profile.py is not in this tree"}
            write = f"import json, sys; json.dump({why!r}, open(sys.argv[1], 'w'))"
            return [Step("profile", [sys.executable, "-c", write, "{json}"], "file", 30.0)]
        return [Step("profile", [*py, "bench.profile", *q, "--json", "{json}"], "file", long)]
    if suite == "ike":
        steps = [Step("ike", [*py, "bench.ike", *q, "--json", "{json}"], "file", long)]
        if os.geteuid() == 0:
            n = "100" if quick else "1000"
            mem = [] if quick else ["--memory-sas", "10000"]
            steps.append(
                Step(
                    "ike-vs-strongswan",
                    [*py, "bench.ike", "--strongswan", n, *mem, *q, "--json", "{json}"],
                    "file",
                    long,
                )
            )
        return steps
    if suite == "replication":
        runs = [] if quick else ["--runs", "3"]  # bus propagation: median run of 3
        return [
            Step(
                "replication",
                [*py, "bench.replication", *q, *runs, "--json", "{json}"],
                "file",
                long,
            )
        ]
    if suite == "throughput":
        return [Step("throughput", [*py, "bench.throughput", *q, "--json", "{json}"], "file", long)]
    if suite == "failover":
        return [Step("failover", [*py, "bench.failover", *q, "--json", "{json}"], "file", long)]
    raise ValueError(suite)


# --------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (res.stdout + res.stderr).splitlines():
        if line.strip() and "failed to load" not in line:
            return line.strip()
    return None


def _dpkg(pkg: str) -> str | None:
    return _first_line(["dpkg-query", "-W", "-f", "${Version}", pkg])


def machine_facts() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
                break
    pkgs: dict[str, str | None] = {}
    for name in ("cryptography", "pyzmq", "msgpack", "uvloop", "pyroute2", "matplotlib"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    with contextlib.suppress(Exception):
        import zmq

        pkgs["libzmq"] = zmq.zmq_version()
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl.backend import backend

        pkgs["openssl"] = backend.openssl_version_text()
    pkgs["strongswan"] = _dpkg("strongswan-charon")
    pkgs["iperf3"] = _first_line(["iperf3", "--version"])
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": pkgs,
        "git_commit": commit,
        "git_dirty": bool(dirty),
        "root": os.geteuid() == 0,
    }


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------


class Progress:
    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.t0 = time.monotonic()
        self.total = total
        self.stream = stream
        self.lock = threading.Lock()

    def elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def line(self, text: str) -> None:
        with self.lock:
            print(f"[{self.elapsed()}] {text}", file=self.stream, flush=True)


def _pump(pipe: Any, sink: Callable[[str], None], keep: list[str]) -> None:
    for raw in iter(pipe.readline, ""):
        line = raw.rstrip("\n")
        keep.append(line)
        if len(keep) > 400:
            del keep[:200]
        sink(line)


def run_step(step: Step, progress: Progress, label: str, workdir: Path) -> dict[str, Any]:
    json_path = workdir / f"{step.name}.json"
    argv = [a.replace("{json}", str(json_path)) for a in step.argv]
    t0 = time.monotonic()
    progress.line(f"{label} {step.name}: start ({' '.join(argv[2:])})")
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    out_lines: list[str] = []
    err_lines: list[str] = []
    show = step.output != "stdout"

    def sink(line: str) -> None:
        if line.strip():
            progress.line(f"{label} {step.name}: {line[:160]}")

    threads = [
        threading.Thread(
            target=_pump, args=(proc.stdout, sink if show else (lambda _l: None), out_lines)
        ),
        threading.Thread(target=_pump, args=(proc.stderr, sink, err_lines)),
    ]
    stdout_all: list[str] = []
    if not show:
        # keep the whole stdout: it is the JSON
        threads[0] = threading.Thread(
            target=lambda: stdout_all.append(proc.stdout.read() if proc.stdout else "")
        )
    for t in threads:
        t.daemon = True
        t.start()
    status = "ok"
    try:
        proc.wait(timeout=step.timeout)
    except subprocess.TimeoutExpired:
        status = f"timeout after {step.timeout:.0f}s"
        _end(proc)
    except KeyboardInterrupt:
        _end(proc)
        raise
    for t in threads:
        t.join(5)
    seconds = time.monotonic() - t0
    result: dict[str, Any] = {"argv": argv[2:], "seconds": round(seconds, 1)}
    if status == "ok" and proc.returncode != 0:
        status = f"exit {proc.returncode}"
    data: Any = None
    try:
        if step.output == "stdout":
            data = json.loads("".join(stdout_all))
        elif step.output == "file":
            data = json.loads(json_path.read_text())
        else:  # jsonlines
            data = [json.loads(x) for x in out_lines if x.startswith("{")]
    except (OSError, ValueError) as exc:
        if status == "ok":
            status = f"no JSON output ({exc.__class__.__name__})"
    result["status"] = status
    result["data"] = data
    if status != "ok":
        result["tail"] = (err_lines + out_lines)[-15:]
    progress.line(f"{label} {step.name}: {status} in {seconds:.1f}s")
    return result


def _end(proc: subprocess.Popen[Any]) -> None:
    """SIGINT first (the suites clean up their namespaces in ``finally``),
    then SIGKILL — by PID."""
    for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n")[0] if __doc__ else None
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds per suite (CI smoke)")
    ap.add_argument("--only", help=f"comma-separated suites among {','.join(ORDER)}")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="default: bench/results")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-retry", action="store_true", help="do not retry a failed step once")
    args = ap.parse_args(argv)
    suites = list(ORDER)
    if args.only:
        suites = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in suites if s not in ORDER]
        if bad:
            ap.error(f"unknown suite(s) {bad}; choose from {','.join(ORDER)}")
    now = datetime.datetime.now(datetime.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.results_dir / stamp
    out_dir.mkdir(parents=True, exist_ok=False)
    command = "python -m bench.run" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    results: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command.replace(f" --results-dir {args.results_dir}", ""),
        "quick": args.quick,
        "suites_requested": suites,
        "machine": machine_facts(),
        "loadavg_before": loadavg(),
        "suites": {},
    }
    all_steps = [(s, st) for s in suites for st in steps_for(s, args.quick)]
    progress = Progress(len(all_steps))
    progress.line(
        f"bench.run: {len(all_steps)} steps in {len(suites)} suites "
        f"({'quick' if args.quick else 'full'}), load average {results['loadavg_before']}, "
        f"output {out_dir}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="anywan-bench-run-"))
    try:
        for i, (suite, step) in enumerate(all_steps, 1):
            label = f"[{i}/{len(all_steps)}] {suite}"
            res = run_step(step, progress, label, workdir)
            if res["status"] != "ok" and not args.no_retry:
                # the machine is shared: a failure can be someone else's
                # process in the way; one more attempt, the first one recorded
                progress.line(f"{label} {step.name}: retrying once after {res['status']}")
                first = {k: res.get(k) for k in ("status", "seconds", "tail")}
                time.sleep(3)
                res = run_step(step, progress, label, workdir)
                res["failed_attempts"] = [first]
            res["loadavg_after"] = loadavg()
            results["suites"].setdefault(suite, {})[step.name] = res
    except KeyboardInterrupt:
        progress.line("interrupted: writing what was measured so far")
        results["interrupted"] = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["loadavg_after"] = loadavg()
    results["seconds"] = round(time.monotonic() - progress.t0, 1)

    from bench import report

    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(report.markdown(results))
    plots: list[str] = []
    if not args.no_plots:
        try:
            from bench import plot

            plots = plot.make_all(results, out_dir)
        except Exception as exc:  # a plotting failure must not lose the numbers
            progress.line(f"plots failed: {exc.__class__.__name__}: {exc}")
            results["plot_error"] = str(exc)
    if plots:
        results["plots"] = plots
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out_dir / "results.md").write_text(report.markdown(results))
    latest = args.results_dir / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            if latest.is_dir() and not latest.is_symlink():
                shutil.rmtree(latest)
            else:
                latest.unlink()
        latest.symlink_to(stamp)
    failed = [
        f"{s}/{n}"
        for s, steps in results["suites"].items()
        for n, r in steps.items()
        if r["status"] != "ok"
    ]
    progress.line(
        f"done in {results['seconds']:.0f}s: {out_dir / 'results.md'}"
        + (f" (failed: {', '.join(failed)})" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
