"""Smoke: ``python -m bench.run --quick`` runs end to end on this machine.

No thresholds (the machine is shared): these tests check that every suite
ran and produced numbers a reader can trust the shape of — machine facts,
same-run anchors and ratios, spreads, plots — and that the throughput
numbers really went through the tunnels (bytes on the site's Child SAs).
CI runs them so the harness never rots. Namespaces: ``awt-b-<pid>-``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(tmp_path: Path, only: str, timeout: float) -> tuple[Path, dict[str, Any]]:
    env = {**os.environ, "ANYWAN_BENCH_NETNS_PREFIX": "awt-b-"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--only",
            only,
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    latest = tmp_path / "latest"
    assert latest.is_symlink(), "bench/results/latest must point at the run"
    out = latest.resolve()
    assert out.parent == tmp_path.resolve()
    results = json.loads((out / "results.json").read_text())
    # progress display: one line per step with the elapsed time
    assert "[00:" in res.stderr and "ok in" in res.stderr
    return out, results


def test_quick_light_suites(tmp_path: Path) -> None:
    out, results = run_bench(tmp_path, "codec,worker,ike,replication", 240)
    m = results["machine"]
    assert m["cores"] == os.cpu_count() and m["kernel"] and m["python"]
    assert m["cpu_model"]
    assert m["packages"]["cryptography"] and m["packages"]["pyzmq"]
    assert results["command"] == "python -m bench.run --quick --only codec,worker,ike,replication"
    for suite in ("codec", "worker", "ike", "replication"):
        for name, step in results["suites"][suite].items():
            assert step["status"] == "ok", (name, step.get("tail"))
            assert step["data"], name
    md = (out / "results.md").read_text()
    # each suite's table, with its anchor ratio
    assert "## Codecs" in md and "bare-gcm256" in md
    assert "## Worker packet path" in md and "÷ bare" in md
    assert "## IKE" in md and "## Replication bus" in md
    # ike and codec repeat their measurements: median (min–max) per number
    assert md.count("median (min–max) of 2 repetitions") >= 2, md
    assert "median (min–max) of 3 interleaved rounds" in md
    for row in results["suites"]["ike"]["ike"]["data"]["rates"]:
        sp = row["spread"]["p99_ms"]
        assert len(sp["values"]) == 2 and sp["min"] <= row["p99_ms"] <= sp["max"]
    if os.geteuid() == 0:
        vs = results["suites"]["ike"]["ike-vs-strongswan"]["data"]["vs_strongswan"]
        assert {r["responder"] for r in vs} == {"anywan", "strongswan"}
        assert all(r["repetitions"] == 2 and r["failed"] == 0 for r in vs), vs
        assert "| ecp384 | handshakes per responder CPU-second |" in md
    for png in results.get("plots", []):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    assert "replication.png" in results["plots"]


@pytest.mark.netns
@pytest.mark.strongswan
def test_quick_throughput_and_failover(tmp_path: Path) -> None:
    out, results = run_bench(tmp_path, "throughput,failover", 300)
    rows = results["suites"]["throughput"]["throughput"]["data"]["rows"]
    by = {(r["mode"], r["cipher"], r["test"]): r for r in rows}
    # the anchors ran and measured something
    for key in (("plain", "none", "tcp-up"), ("strongswan", "aes256gcm", "tcp-up")):
        assert by[key]["median"] > 0, by[key]
    sw = by[("strongswan", "aes256gcm", "tcp-up")]
    assert sw["sa_bytes"] > 1_000_000, "strongSwan traffic did not go through the Child SAs"
    assert sw["cpu"]["processes"]["charon responder"]["cpu_pct"] > 0
    # anywan rows: a number with its ratio to strongSwan, or an explicit reason
    for mode in ("anywan-1w", "anywan-2w"):
        r = by[(mode, "aes256gcm", "tcp-up")]
        if "status" in r:
            assert r["status"].startswith("not run: ") and "median" not in r
            continue
        assert r["median"] > 0 and r["sa_bytes"] > 1_000_000
        assert r["anchor"] == "strongswan"
        assert r["ratio"] == pytest.approx(r["median"] / sw["median"])
        assert any(k.startswith("anywan-worker") for k in r["cpu"]["processes"])
    md = (out / "results.md").read_text()
    assert "## Tunnel throughput" in md and "What limited each number" in md
    assert "throughput.png" in results["plots"]
    assert (out / "throughput.png").read_bytes()[:8] == PNG_MAGIC
    # failover: traffic continued after the worker carrying it was killed
    frows = results["suites"]["failover"]["failover"]["data"]["rows"]
    kills = [r for r in frows if r["test"] == "worker-kill" and "median" in r]
    assert kills, frows
    for r in kills:
        assert len(r["reps"]) == 2
        for d in r["detail"]:
            assert d["received"] > d["sent"] // 2, d
            assert d["outage_ms"] < 3000, d
    assert "## Failover and rekey" in md
    # nothing left behind by the (finished) benchmark processes
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for m in re.finditer(r"awt-b-(?:tp|fo)-(\d+)-\S*", names):
        assert Path(f"/proc/{m.group(1)}").exists(), f"leftover namespace {m.group(0)}"
