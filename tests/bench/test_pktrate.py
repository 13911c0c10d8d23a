"""bench.pktrate: the generator's probes, the ratios, the report table, and a
--quick run through real worker processes in ``awt-p-<pid>-`` namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pktrate, report
from deploy.netns import list_namespaces

ROOT = Path(__file__).resolve().parents[2]

PROC_UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100710C:1194 00000000:0000 07 00000000:00004000 00:00000000 00000000     0        0 1 2 0 3
  101: 0100710C:1194 00000000:0000 07 00000000:00001000 00:00000000 00000000     0        0 1 2 0 2
  102: 0100710C:01F4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 9
"""  # noqa: E501
PROC_RAW = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   47: 0100710C:002F 00000000:0000 07 00000000:00000200 00:00000000 00000000     0        0 1 2 0 5
   50: 0100710C:0032 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 7
"""  # noqa: E501
PROC_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
   aw0:    1000      10    0    0    0     0          0         0     5000      50    0   42    0     0       0          0
"""  # noqa: E501


def test_probe_parses_proc_files(tmp_path: Path) -> None:
    (tmp_path / "udp").write_text(PROC_UDP)
    (tmp_path / "raw").write_text(PROC_RAW)
    (tmp_path / "dev").write_text(PROC_DEV)
    udp = {"kind": "udp", "path": str(tmp_path / "udp"), "port": ":1194", "per_skb": 64}
    # smallest queue of the two port-4500 sockets; drops are skbs of 64 datagrams
    assert pktrate.read_probe(udp) == (0x1000, (3 + 2) * 64)
    raw = {"kind": "raw", "path": str(tmp_path / "raw"), "port": ":002F"}
    assert pktrate.read_probe(raw) == (0x200, 5)
    dev = {"kind": "netdev-tx", "path": str(tmp_path / "dev"), "dev": "aw0"}
    assert pktrate.read_probe(dev) == (None, 42)
    assert pktrate.read_probe({"kind": "udp", "path": str(tmp_path / "nope"), "port": ":1"}) == (
        None,
        0,
    )


def test_segments_fit_one_udp_datagram() -> None:
    assert pktrate.segments(64) == 64
    n = pktrate.segments(1400)
    assert n * (1400 - 28) <= 65507 < (n + 1) * (1400 - 28)
    # ESP-in-UDP at 1400 B: the outer datagram sets the count
    assert pktrate.segments(1400, 1436) == 65507 // 1436


def test_ratios_report_table_and_plot(tmp_path: Path) -> None:
    rows = [
        {"kind": "aes256gcm", "size": 64, "op": "encap", "workers": w, "kpps": k,
         "gbit_s": k * 64 * 8 / 1e6, "per_worker_kpps": [k / w] * w,
         "cpu": {"processes": {"generator": {"cpu_pct": 10.0}}, "machine_busy_pct": 90.0}}
        for w, k in ((1, 140.0), (2, 240.0))
    ]  # fmt: skip
    rows.append({"kind": "gre", "size": 1400, "op": "decap", "workers": 1, "status": "not run: x"})
    pktrate.add_ratios(rows)
    assert rows[0]["goal_150kpps"] is False and rows[1]["goal_150kpps"] is True
    assert rows[1]["ratio_2w_1w"] == pytest.approx(240 / 140, abs=0.01)
    assert rows[1]["goal_1_6x"] is True
    results = {
        "suites": {
            "pktrate": {
                "pktrate": {"status": "ok", "data": {"rows": rows, "config": {"window_s": 5}}}
            }
        }
    }
    md = report.pktrate_md(results)
    assert md.startswith("## Packet rate of the worker processes")
    assert "| AES-256-GCM | 64 | encap | 140 ✗ |" in md
    assert "**1.71×**" in md and "not run: x" in md
    assert "## Packet rate" in report.markdown({**results, "machine": {}})
    pytest.importorskip("matplotlib")
    from bench import plot

    png = tmp_path / "pktrate.png"
    assert plot.pktrate_figure(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pktrate.png" in plot.make_all(results, tmp_path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)")


@pytest.mark.netns
@needs_root
def test_quick_run_carries_packets_through_each_worker(tmp_path: Path) -> None:
    out = tmp_path / "pktrate.json"
    env = {**os.environ, "ANYWAN_PKTRATE_NETNS_PREFIX": "awt-p-"}
    res = subprocess.run(
        [sys.executable, "-m", "bench.pktrate", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["kind"], r["size"], r["op"], r["workers"]) for r in rows} == {
        (k, s, o, w) for k, s, o in pktrate.cells(True) for w in (1, 2)
    }
    for r in rows:
        assert "status" not in r, r
        # every worker really carried packets in the window, and the sink saw them
        assert len(r["per_worker_packets"]) == r["workers"]
        assert all(p > 0 for p in r["per_worker_packets"]), r
        assert r["kpps"] > 0 and r["gbit_s"] > 0
        assert r["sink"]["packets"] > 0 and r["generator"]["sent_kpps"] > 0
        procs = r["cpu"]["processes"]
        assert "generator" in procs and "anywan-worker 0" in procs
        assert procs["anywan-worker 0"]["cpu_pct"] > 0
        assert 0 < r["cpu"]["machine_busy_pct"] <= 100
        if r["workers"] == 2:
            assert "ratio_2w_1w" in r and "anywan-worker 1" in procs
        if r["size"] == 64:
            assert isinstance(r["goal_150kpps"], bool)
        if r["op"] == "decap" and r["kind"] != "gre":
            # the decap sink counts single inner packets: at least what the
            # workers counted in the window (it is read around the window)
            assert r["sink"]["packets"] >= sum(r["per_worker_packets"]) * 0.9
    pid_prefix = [n for n in list_namespaces("awt-p-") if n.split("-")[2].isdigit()]
    assert not [n for n in pid_prefix if not os.path.exists(f"/proc/{n.split('-')[2]}")], (
        "namespaces of a finished run left behind"
    )
