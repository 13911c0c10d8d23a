"""The benchmark harness's own logic, without running any benchmark (fast):
probe loss accounting, iperf3 parsing, anchors/ratios, the markdown and the
plots of a result — including that a configuration which did not run shows
its reason and never a number."""

from __future__ import annotations

import io
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


def test_socket_drops_say_where_datagrams_were_lost() -> None:
    """The initiators' receive-buffer drops (/proc/net/snmp RcvbufErrors) per
    test: the share lost, and the limit note names every namespace >= 0.5 %."""

    class Ns:
        def __init__(self, text: str) -> None:
            self.text = text

        def run(self, argv: list[str], **_kw: object) -> object:
            assert argv == ["cat", "/proc/net/snmp"]
            return type("R", (), {"stdout": self.text})()

    snmp = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n"
        "Udp: {d} 0 {e} 5 {e} 0\n"
    )
    assert throughput.udp_counters(Ns(snmp.format(d=1000, e=7))) == (1000, 7)
    assert throughput.udp_counters(Ns("Ip: x\n")) == (0, 0)
    before = {"s1": (1000, 7), "s2": (50, 0), "node": (10, 0)}
    after = {"s1": (10700, 307), "s2": (1050, 2), "node": (10, 0)}
    drops = throughput.socket_drops(before, after)
    assert drops == {
        "s1": {"datagrams": 9700, "rcvbuf_drops": 300, "drop_pct": 3.0},
        "s2": {"datagrams": 1000, "rcvbuf_drops": 2, "drop_pct": 0.2},
    }
    assert throughput.drops_note(drops) == "; s1 socket dropped 3.0 %"


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
    assert "ns/packet, median of None" not in md  # a failed suite: no empty table
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


# --------------------------------------------------------------------------
# repetitions (ike, codec), the profile suite, SA propagation
# --------------------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parents[2] / "bench/results/20261129T030112Z"


def test_the_committed_run_still_renders_and_plots(tmp_path: Path) -> None:
    """Results written before ike/codec repeated (plain numbers, no spread)
    keep rendering: same numbers, marked as single runs, no crash."""
    results = json.loads((COMMITTED / "results.json").read_text())
    md = report.markdown(results)
    assert "| ecp384 | 700 | 1435 | 1.41 | 1.81 |" in md
    assert "one run each (no repetitions in this result)" in md
    assert "tracemalloc traced, whose bookkeeping inflates it" in md
    assert "| ecp384 | handshakes per responder CPU-second | 1031 | 426 | 2.42× |" in md
    assert "| esp | aes128gcm16 | 1400 | encap | 941 | bare-gcm128 | 541 | 1.74× |" in md
    assert "Per-stage profile" not in md  # that run had no profile suite
    made = plot.make_all(results, tmp_path)
    assert "ike.png" in made and "throughput.png" in made


def _ike_run(**kw: float) -> dict[str, Any]:
    base = {
        "wall_s": 2.0,
        "p50_ms": 2.0,
        "p99_ms": 3.0,
        "responder_cpu_s": 1.0,
        "responder_handshakes_per_cpu_s": 1000.0,
        "handshakes_per_s_wall": 500.0,
        "responder_rss_growth_per_sa": 8000.0,
    }
    return {**base, **kw}


def repeated_ike() -> dict[str, Any]:
    from bench import ike

    aw = [
        _ike_run(responder_handshakes_per_cpu_s=v, p99_ms=p)
        for v, p in ((900.0, 2.5), (1000.0, 9.0), (1500.0, 3.0))
    ]
    sw = [
        _ike_run(responder_handshakes_per_cpu_s=v, p99_ms=p)
        for v, p in ((400.0, 4.0), (500.0, 6.0), (450.0, 5.0))
    ]
    vs = []
    for resp, runs in (("strongswan", sw), ("anywan", aw)):
        row = ike.repeated(runs, ike.VS_KEYS)
        row.update(group="ecp384", responder=resp, handshakes=1000, failed=0)
        vs.append(row)
    rate = [
        {
            "pair_handshakes_per_s": v,
            "pair_handshakes_per_s_wall": v,
            "responder_handshakes_per_s": 2 * v,
            "responder_ms_per_handshake": 1000 / (2 * v),
            "p50_ms": 1.4,
            "p99_ms": p99,
        }
        for v, p99 in ((700.0, 1.8), (650.0, 2.6), (720.0, 1.7))
    ]
    mem = [
        {"rss_bytes_per_sa": r, "python_heap_bytes_per_sa": 5700.0}
        for r in (23000.0, 24000.0, 23500.0)
    ]
    res = synthetic()
    res["suites"]["ike"] = {
        "ike": {
            "status": "ok",
            "data": {
                "rates": [
                    {"group": "ecp384", "handshakes": 1000, **ike.repeated(rate, ike.RATE_KEYS)}
                ],
                "memory": [{"ike_sas": 1000, **ike.repeated(mem, ike.MEMORY_KEYS)}],
            },
        },
        "ike-vs-strongswan": {"status": "ok", "data": {"vs_strongswan": vs}},
    }
    return res


def test_ike_repetitions_show_median_and_spread_ratio_of_medians(tmp_path: Path) -> None:
    res = repeated_ike()
    vs = res["suites"]["ike"]["ike-vs-strongswan"]["data"]["vs_strongswan"]
    aw = next(r for r in vs if r["responder"] == "anywan")
    assert aw["responder_handshakes_per_cpu_s"] == 1000.0  # the median, not the mean
    assert aw["spread"]["p99_ms"] == {"min": 2.5, "max": 9.0, "values": [2.5, 9.0, 3.0]}
    md = report.markdown(res)
    # ratio on the medians: 1000 / 450 (the mean ratio would be 1133 / 450)
    assert (
        "| ecp384 | handshakes per responder CPU-second | 1000 (900–1500) | 450 (400–500) "
        "| 2.22× |" in md
    )
    assert "| ecp384 | p99 handshake latency, ms | 3 (2.5–9) | 5 (4–6) | 0.60× |" in md
    assert "| ecp384 | 700 (650–720) | 1400 (1300–1440) | 1.4 (1.4–1.4) | 1.8 (1.7–2.6) |" in md
    assert "| 1000 | 23500 (23000–24000) | 5700 (5700–5700) |" in md
    assert md.count("median (min–max) of 3 repetitions") == 3
    assert "RSS growth untraced" in md
    made = plot.make_all(res, tmp_path)
    assert "ike.png" in made
    assert (tmp_path / "ike.png").read_bytes()[:8] == PNG_MAGIC


def test_codec_rows_carry_min_max_of_the_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import codec

    assert codec.main(["--suite", "gre", "--iterations", "20", "--rounds", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    bare = {(r["case"], r["size"]): r for r in rows if r["suite"] == "bare"}
    for r in rows:
        sp = r["spread"]["ns_per_packet"]
        assert r["repetitions"] == 3 and len(sp["values"]) == 3
        assert sp["min"] <= r["ns_per_packet"] <= sp["max"]
        anchor = bare[(r["baseline"], r["size"])]["ns_per_packet"]
        assert r["ratio"] == pytest.approx(r["ns_per_packet"] / anchor, rel=2e-3, abs=0.01)
    res = synthetic()
    res["suites"]["codec"] = {"codec": {"status": "ok", "data": data}}
    md = report.markdown(res)
    enc = next(r for r in rows if r["case"] == "gre" and r["op"] == "encap" and r["size"] == 64)
    sp = enc["spread"]["ns_per_packet"]
    cell = f"{report.num(enc['ns_per_packet'])} ({report.num(sp['min'])}–{report.num(sp['max'])})"
    assert f"| gre | gre | 64 | encap | {cell} | bare-copy |" in md
    assert "median (min–max) of 3 interleaved rounds" in md


def _with_profile(step: dict[str, Any]) -> dict[str, Any]:
    res = synthetic()
    res["suites"]["profile"] = {"profile": step}
    return res


def test_profile_section_never_breaks_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    ok = {"status": "ok", "data": {"rows": [], "config": {}}}
    # the module is missing (not written yet): one clear line
    monkeypatch.setitem(sys.modules, "bench.profile", None)
    md = report.markdown(_with_profile(ok))
    assert "**profile suite: not available** (bench.profile: ModuleNotFoundError" in md
    assert "| AES-256-GCM | 0.6 (0.5–0.7)" in md  # the rest of the report is there
    # its markdown() raises
    broken = types.ModuleType("bench.profile")

    def boom(result: dict[str, Any]) -> list[str]:
        raise KeyError("stages")

    broken.markdown = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.profile", broken)
    md = report.markdown(_with_profile(ok))
    assert "**profile suite: failed to render** (bench.profile.markdown: KeyError" in md
    # it works: its lines are the section, after the worker section
    fine = types.ModuleType("bench.profile")
    fine.markdown = lambda result: ["## Per-stage profile (`bench.profile`)", "", "| x |"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.profile", fine)
    md = report.markdown(_with_profile(ok))
    assert "## Per-stage profile (`bench.profile`)\n\n| x |" in md
    # the step failed or was skipped (no root): said so, no number
    md = report.markdown(_with_profile({"status": "exit 1", "data": None, "tail": ["perf: x"]}))
    assert "## Per-stage profile of one worker" in md and "**profile: exit 1** (perf: x)" in md
    md = report.markdown(_with_profile({"status": "ok", "data": {"skipped": "needs root"}}))
    assert "**profile: skipped** — needs root" in md


def test_profile_suite_is_wired_after_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import run

    assert run.ORDER.index("profile") == run.ORDER.index("worker") + 1
    (step,) = run.steps_for("profile", quick=True)
    assert step.argv[2:] == ["bench.profile", "--quick", "--json", "{json}"]
    # a tree without bench/profile.py records the suite as not available
    monkeypatch.setattr(run, "HERE", tmp_path)
    (step,) = run.steps_for("profile", quick=True)
    out = run.run_step(step, run.Progress(1, stream=io.StringIO()), "[1/1]", tmp_path)
    assert out["status"] == "ok"
    assert out["data"]["skipped"].startswith("not available: bench/profile.py")
    md = report.markdown(_with_profile(out))
    assert "**profile: skipped** — not available: bench/profile.py is not in this tree" in md


def _replication(extra: dict[str, Any]) -> dict[str, Any]:
    res = synthetic()
    res["suites"]["replication"] = {"replication": {"status": "ok", "data": extra}}
    return res


def _sa_row(n: int, p50: float, p99: float, rep99: list[float]) -> dict[str, Any]:
    """The shape bench.replication writes under ``sa_propagation``."""
    return {
        "subscribers": n,
        "handshakes": 300,
        "child_sas": 300,
        "reps": 3,
        "interval_s": 0.02,
        "not_usable_everywhere": 0,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": 2 * p99,
        "rep_p50_ms": [p50 * 0.9, p50, p50 * 1.2],
        "rep_p99_ms": rep99,
        "first_worker_p50_ms": p50 / 2,
        "first_worker_p99_ms": p99 / 2,
        "published_p50_ms": 0.4,
        "published_p99_ms": 0.9,
        "bus_p50_ms": p50 - 0.4,
        "bus_p99_ms": p99 - 0.9,
        "handler_p50_ms": {"ChildSaInstalled": 0.3},
        "handler_p99_ms": {"ChildSaInstalled": 0.8},
        "gaps": 0,
        "apply_errors": 0,
    }


def test_sa_propagation_table_from_the_replication_result(tmp_path: Path) -> None:
    rows = [
        _sa_row(1, 1.0, 2.0, [1.8, 2.0, 2.5]),
        _sa_row(4, 1.5, 4.0, [3.0, 4.0, 4.4]),
        _sa_row(16, 3.0, 12.0, [8.0, 12.0, 13.0]),
    ]
    md = report.markdown(_replication({"sa_propagation": rows, "propagation": []}))
    assert "IKE_AUTH response" in md and "300 Child SAs in 3 repetitions" in md
    assert (
        "| workers N | p50 ms | p99 ms | spread | first worker p50 ms | → published p99 ms "
        "| bus + apply p99 ms | not usable on all | p99 ÷ N=1 |" in md
    )
    assert "| 1 | 1 | 2 | p50 0.9–1.2, p99 1.8–2.5 over 3 reps; max 4 | 0.5 | 0.9 | 1.1 | 0 " in md
    assert "| 16 | 3 | 12.0 | p50 2.7–3.6, p99 8–13.0 over 3 reps; max 24.0 |" in md
    assert md.rstrip().endswith("| 6.00× |")  # 12 / 2, the same run's N = 1
    res = _replication({"sa_propagation": rows})
    assert "replication.png" in plot.make_all(res, tmp_path)
    assert (tmp_path / "replication.png").read_bytes()[:8] == PNG_MAGIC


def test_sa_propagation_table_reads_other_shapes() -> None:
    rows = [
        {"workers": 1, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0, "min_ms": 0.5, "samples": 200},
        {"workers": 4, "p50_ms": 1.5, "p99_ms": 4.0, "max_ms": 6.0, "min_ms": 0.7, "samples": 200},
        {
            "workers": 16,
            "p50_ms": 3.0,
            "p99_ms": 10.0,
            "repetitions": 3,
            "spread": {"p99_ms": {"min": 8.0, "max": 12.0, "values": [8.0, 10.0, 12.0]}},
        },
    ]
    md = report.markdown(_replication({"sa_propagation": rows}))
    assert "| 1 | 1 | 2 | all samples 0.5–3; 200 samples | 1.00× |" in md
    assert "| 4 | 1.5 | 4 | all samples 0.7–6; 200 samples | 2.00× |" in md
    assert "| 16 | 3 | 10.0 (8–12.0) | p99 8–12.0 over 3 reps | 5.00× |" in md
    # keyed by N, other names
    md = report.markdown(
        _replication(
            {"sa_usable_on_workers": {"1": {"p50": 0.2, "p99": 0.4}, "4": {"p50": 0.3, "p99": 1.2}}}
        )
    )
    assert "| 1 | 0.2 | 0.4 | — | 1.00× |" in md and "| 4 | 0.3 | 1.2 | — | 3.00× |" in md
    # absent: no table, and garbage does not crash
    assert "IKE_AUTH response" not in report.markdown(_replication({"propagation": []}))
    report.markdown(_replication({"sa_propagation": [{"workers": "x"}, 3, None]}))


def test_profile_section_uses_bench_profile_markdown() -> None:
    from bench import profile

    res = _with_profile({"status": "ok", "data": {"rows": [], "config": {"seconds": 8}}})
    md = report.markdown(res)
    section = md[md.index("## Per-stage profile") : md.index("## Codecs")]
    assert section.count("## ") == 1  # its own heading, not ours twice
    assert (
        section.strip()
        == "\n".join(profile.markdown(res["suites"]["profile"]["profile"]["data"])).strip()
    )
    assert md.index("## Failover") < md.index("## Per-stage profile")  # after worker (none here)


def test_bus_propagation_with_runs_and_the_forwarder_row() -> None:
    def p(
        n: int, p99: float, runs99: list[float], pub_us: float, fwd: bool = False
    ) -> dict[str, Any]:
        return {
            "subscribers": n,
            "p50_ms": 0.5,
            "p99_ms": p99,
            "max_ms": 2 * p99,
            "gaps": 0,
            "runs_p50_ms": [0.4, 0.5, 0.7],
            "runs_p99_ms": runs99,
            "publisher_cpu_us_per_update": pub_us,
            "via_forwarder": fwd,
        }

    data = {
        "propagation": [p(1, 2.0, [1.5, 2.0, 3.0], 40.0), p(16, 30.0, [20.0, 30.0, 31.0], 400.0)],
        "propagation_forwarder": [p(16, 8.0, [6.0, 8.0, 9.0], 35.0, fwd=True)],
    }
    md = report.markdown(_replication(data))
    assert "the run with the median p99 of 3 runs" in md
    assert "| 16 | 0.5 | 30.0 | 60.0 | 0 | 15.00× | p50 0.4–0.7, p99 20.0–31.0 | 400 µs |" in md
    assert (
        "| 16 via forwarder | 0.5 | 8 | 16.0 | 0 | 4.00× | p50 0.4–0.7, p99 6–9 | 400 / 35.0 µs |"
        in md
    )


def test_ike_memory_against_strongswan_by_sa_count(tmp_path: Path) -> None:
    from bench import ike

    res = repeated_ike()
    vdata = res["suites"]["ike"]["ike-vs-strongswan"]["data"]
    vdata["memory_vs_strongswan"] = [
        {
            "group": "ecp384",
            "responder": resp,
            "ike_sas": 10000,
            "failed": 0,
            **ike.repeated(
                [{"responder_rss_growth_per_sa": v, "handshakes_per_s_wall": 300.0} for v in vals],
                ("responder_rss_growth_per_sa", "handshakes_per_s_wall"),
            ),
        }
        for resp, vals in (("anywan", [7000.0, 7100.0, 9000.0]), ("strongswan", [19000.0] * 3))
    ]
    md = report.markdown(res)
    assert "| IKE SAs | anywan B/SA | strongSwan B/SA | anywan ÷ sS |" in md
    assert "| 1000 | 8000 (8000–8000) | 8000 (8000–8000) | 1.00× |" in md  # from the vs runs
    assert "| 10000 | 7100 (7000–9000) | 19000 (19000–19000) | 0.37× |" in md
    assert plot.ike_figure(res, tmp_path / "ike.png")  # with its memory panel
    assert (tmp_path / "ike.png").read_bytes()[:8] == PNG_MAGIC


def test_ike_memory_rss_is_measured_without_tracing() -> None:
    """tracemalloc's per-allocation traces are RSS too: measured traced, the
    RSS growth per IKE SA read ~23 KB instead of ~6 KB. RSS and heap are now
    separate fresh processes."""
    import subprocess
    import sys

    def run(*extra: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "bench.ike", "--memory", "400", *extra],
            cwd=COMMITTED.parents[2],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return dict(json.loads(out))

    rss = run()
    assert set(rss) == {"ike_sas", "rss_bytes_per_sa"}
    assert 0 < rss["rss_bytes_per_sa"] < 15_000
    heap = run("--heap")
    assert set(heap) == {"ike_sas", "python_heap_bytes_per_sa"}
    assert 2_000 < heap["python_heap_bytes_per_sa"] < 15_000


def test_worker_and_snapshot_rows_show_their_spread() -> None:
    """bench.worker's rounds and the snapshot's runs appear as median/best (min–max)."""
    from bench import worker

    rows = worker.run(quick=True)
    r = rows[0]
    sp = r["spread"]["worker_ns"]
    assert r["repetitions"] == 3 and len(sp["values"]) == 3
    assert sp["min"] <= r["worker_ns"] <= sp["max"]
    res = synthetic()
    res["suites"]["worker"] = {"worker": {"status": "ok", "data": {"rows": rows}}}
    res["suites"]["replication"] = {
        "replication": {
            "status": "ok",
            "data": {
                "snapshot": [
                    {"records": 1000, "ready_s": 0.016, "ready_all_s": [0.016, 0.02, 0.031]}
                ]
            },
        }
    }
    md = report.markdown(res)
    cell = f"{r['worker_ns']} ({report.num(sp['min'])}–{report.num(sp['max'])})"
    assert f"| {cell} |" in md
    assert "median (min–max) of 3 repetitions (interleaved rounds)" in md
    assert "| 1000 | 0.016 (0.016–0.031) |" in md
