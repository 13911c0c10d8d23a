"""The benchmark harness's own logic, without running any benchmark (fast):
probe loss accounting, iperf3 parsing, anchors/ratios, the markdown and the
plots of a result — including that a configuration which did not run shows
its reason and never a number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import failover, plot, report, throughput

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_probe_summary_outage_is_longest_loss_run() -> None:
    sent = 1000
    got = {k: k / 1000 for k in range(sent) if not (300 <= k < 342) and k not in (500, 501)}
    s = failover.summarize(sent, got, 0.001)
    assert s["lost"] == 44
    assert s["outage_ms"] == pytest.approx(42.0)
    assert s["outage_at_s"] == pytest.approx(0.3)
    assert s["max_echo_gap_ms"] == pytest.approx(43.0, abs=0.01)
    assert s["lost_seqs"][:2] == [300, 301]


def test_probe_summary_nothing_received_is_all_lost_not_a_crash() -> None:
    s = failover.summarize(100, {}, 0.01)
    assert s["lost"] == 100 and s["received"] == 0 and s["max_echo_gap_ms"] == 0.0


def test_probe_over_loopback_counts_echoes() -> None:
    import threading

    t = threading.Thread(target=failover.echo_server, args=("127.0.0.1", 47999, 3.0), daemon=True)
    t.start()
    s = failover.probe("127.0.0.1", "127.0.0.1", 47999, 500, 0.5)
    assert s["sent"] == 250
    assert s["received"] >= 240  # loopback: nothing should be lost


def test_parse_iperf_tcp_and_udp() -> None:
    tcp = {"end": {"sum_received": {"bits_per_second": 5e8}, "sum_sent": {"retransmits": 3}}}
    assert throughput.parse_iperf(tcp, False) == {"received_bps": 5e8, "retransmits": 3.0}
    udp = {
        "end": {"sum": {"seconds": 2.0, "packets": 1000, "lost_packets": 100, "lost_percent": 10}}
    }
    r = throughput.parse_iperf(udp, True)
    assert r["sent_pps"] == 500 and r["received_pps"] == 450 and r["lost_pct"] == 10


def _row(mode: str, cipher: str, test: str, reps: list[float]) -> dict[str, Any]:
    vs = sorted(reps)
    return {
        "suite": "throughput",
        "mode": mode,
        "cipher": cipher,
        "test": test,
        "unit": throughput.TESTS[test][1],
        "median": vs[len(vs) // 2],
        "min": vs[0],
        "max": vs[-1],
        "reps": vs,
        "cpu": {
            "processes": {"x": {"cpu_pct": 97.0, "busiest_thread_pct": 96.0}},
            "machine_busy_pct": 100.0,
        },
    }


def synthetic() -> dict[str, Any]:
    rows = [
        _row("plain", "none", "tcp-up", [10.0, 11.0, 12.0]),
        _row("strongswan", "aes256gcm", "tcp-up", [0.5, 0.6, 0.7]),
        _row("anywan-1w", "aes256gcm", "tcp-up", [0.8, 0.9, 1.0]),
        _row("anywan-2w", "aes256gcm", "tcp-up", [1.7, 1.8, 1.9]),
        _row("anywan-1w", "gre", "tcp-up", [2.0, 2.2, 2.4]),
        _row("plain", "none", "udp64", [200.0, 210.0, 220.0]),
        _row("strongswan", "aes256gcm", "udp64", [30.0, 31.0, 32.0]),
        {
            "suite": "throughput",
            "mode": "anywan-2w",
            "cipher": "gre",
            "test": "tcp-up",
            "unit": "Gbit/s",
            "status": "not run: worker exited 2",
        },
    ]
    throughput.add_ratios(rows)
    return {
        "date": "2026-01-01 00:00:00 UTC",
        "command": "python -m bench.run --quick",
        "quick": True,
        "machine": {"cpu_model": "Test CPU", "cores": 2, "packages": {"cryptography": "50"}},
        "loadavg_before": [1.0, 1.0, 1.0],
        "loadavg_after": [1.0, 1.0, 1.0],
        "seconds": 1.0,
        "suites": {
            "throughput": {
                "throughput": {
                    "status": "ok",
                    "data": {"rows": rows, "config": {"sites": 2, "reps": 3, "seconds": 5}},
                }
            },
            "failover": {
                "failover": {
                    "status": "ok",
                    "data": {
                        "rows": [
                            failover._row(
                                "worker-kill",
                                "aes256gcm",
                                "anywan-2w",
                                [{"outage_ms": v} for v in (5.0, 7.0, 220.0)],
                                "outage_ms",
                            )
                        ],
                        "config": {"rate_pps": 1000},
                    },
                }
            },
            "codec": {"codec": {"status": "exit 1", "data": None, "tail": ["Traceback", "boom"]}},
        },
    }


def test_ratios_use_the_same_run_anchor() -> None:
    rows = synthetic()["suites"]["throughput"]["throughput"]["data"]["rows"]
    by = {(r["mode"], r["cipher"], r["test"]): r for r in rows}
    one = by[("anywan-1w", "aes256gcm", "tcp-up")]
    assert one["anchor"] == "strongswan" and one["ratio"] == pytest.approx(0.9 / 0.6)
    two = by[("anywan-2w", "aes256gcm", "tcp-up")]
    assert two["ratio_vs_1w"] == pytest.approx(1.8 / 0.9)
    gre = by[("anywan-1w", "gre", "tcp-up")]
    assert gre["anchor"] == "plain" and gre["ratio"] == pytest.approx(2.2 / 11.0)
    sw = by[("strongswan", "aes256gcm", "udp64")]
    assert sw["anchor"] == "plain" and sw["ratio"] == pytest.approx(31.0 / 210.0)
    assert "ratio" not in by[("anywan-2w", "gre", "tcp-up")]  # not run: no ratio


def test_markdown_has_ratios_spreads_and_reasons() -> None:
    md = report.markdown(synthetic())
    assert (
        "| AES-256-GCM | 0.6 (0.5–0.7) | 0.05× | 0.9 (0.8–1) | 1.50× "
        "| 1.8 (1.7–1.9) | 3.00× | 2.00× |" in md
    )
    assert "not run: worker exited 2" in md
    assert "**codec: exit 1**" in md and "boom" in md
    assert "Test CPU, 2 cores" in md
    assert "7 (5–220)" in md  # failover: median and min–max over repetitions


def test_plots_are_written(tmp_path: Path) -> None:
    made = plot.make_all(synthetic(), tmp_path)
    assert "throughput.png" in made and "ratios.png" in made and "failover.png" in made
    for name in made:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # a result written as JSON re-plots from the command line
    (tmp_path / "results.json").write_text(json.dumps(synthetic()))
    assert plot.main([str(tmp_path / "results.json")]) == 0


def test_limiter_names_the_saturated_process() -> None:
    cpu = {
        "processes": {
            "charon responder": {"cpu_pct": 150.0, "busiest_thread_pct": 97.0},
            "iperf3": {"cpu_pct": 20.0, "busiest_thread_pct": 20.0},
        },
        "machine_busy_pct": 60.0,
    }
    text = throughput.limiter(cpu)
    assert text.startswith("charon responder busiest thread 97% (saturated)")
    assert "CPU-bound" not in text


def test_per_core_uses_the_responders_cpu_only() -> None:
    cpu = {
        "processes": {
            "anywan-worker 0": {"cpu_pct": 60.0, "busiest_thread_pct": 60.0},
            "anywan-worker 1": {"cpu_pct": 20.0, "busiest_thread_pct": 20.0},
            "charon s1 (initiator)": {"cpu_pct": 90.0, "busiest_thread_pct": 30.0},
        }
    }
    assert throughput.responder_cpu(cpu) == pytest.approx(80.0)
    sw = {"processes": {"charon responder": {"cpu_pct": 50.0, "busiest_thread_pct": 20.0}}}
    assert throughput.responder_cpu(sw) == pytest.approx(50.0)


def test_a_retried_step_says_so() -> None:
    res = synthetic()
    step = res["suites"]["throughput"]["throughput"]
    step["failed_attempts"] = [{"status": "exit 1", "tail": ["OSError: Address already in use"]}]
    md = report.markdown(res)
    assert "first attempt failed (exit 1: OSError: Address already in use); retried" in md
    assert "| AES-256-GCM | 0.6 (0.5–0.7)" in md  # the retried step's numbers still shown
