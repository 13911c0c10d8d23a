"""The replication benchmark runs end to end (tiny sizes, no thresholds)."""

from __future__ import annotations

from pathlib import Path

from bench.replication import Lab, ike_propagation_run, snapshot_run, stream_run


def test_bench_stream_and_snapshot_smoke(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "keys")
    r = stream_run(lab, n_subs=2, rate=200, seconds=0.5, keys=50)
    assert r["sent"] == 100
    assert r["applied_min"] == 100 and r["gaps"] == 0
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    s = snapshot_run(lab, 300)
    assert s["received"] == 300 and s["ready_s"] > 0


def test_bench_ike_auth_to_usable_smoke(tmp_path: Path) -> None:
    """Real IKE exchanges against the control service's engine; every Child SA
    becomes usable (both records applied by the worker's Dataplane) in both
    subscriber processes, and the latencies are ordered sensibly."""
    lab = Lab(tmp_path / "keys")
    r = ike_propagation_run(lab, n_subs=2, handshakes=3, reps=2, interval=0.01)
    assert r["handshakes"] == 6 and r["child_sas"] == 6
    assert r["not_usable_everywhere"] == 0 and r["gaps"] == 0 and r["apply_errors"] == 0
    assert 0 < r["first_worker_p50_ms"] <= r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert 0 < r["published_p50_ms"] < r["max_ms"]
    assert len(r["rep_p50_ms"]) == len(r["rep_p99_ms"]) == 2


def test_bench_stream_behind_a_forwarder_smoke(tmp_path: Path) -> None:
    """Subscribers attached to a forwarder process get every update; the
    publisher and forwarder CPU per update are measured."""
    lab = Lab(tmp_path / "keys")
    r = stream_run(lab, n_subs=2, rate=200, seconds=0.5, keys=50, via_forwarder=True)
    assert r["via_forwarder"] and r["sent"] == 100
    assert r["applied_min"] == 100 and r["gaps"] == 0
    assert r["publisher_cpu_us_per_update"] > 0 and r["forwarder_cpu_us_per_update"] > 0
