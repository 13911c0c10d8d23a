"""The replication benchmark runs end to end (tiny sizes, no thresholds)."""

from __future__ import annotations

from pathlib import Path

from bench.replication import Lab, snapshot_run, stream_run


def test_bench_stream_and_snapshot_smoke(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "keys")
    r = stream_run(lab, n_subs=2, rate=200, seconds=0.5, keys=50)
    assert r["sent"] == 100
    assert r["applied_min"] == 100 and r["gaps"] == 0
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    s = snapshot_run(lab, 300)
    assert s["received"] == 300 and s["ready_s"] > 0
