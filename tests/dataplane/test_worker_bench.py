"""Smoke test of ``python -m bench.worker --quick``: every case builds, the
worker path delivers each packet without a drop (``build`` checks), and the
report has a row per (kind, size, op)."""

from __future__ import annotations

from bench import worker


def test_bench_worker_quick_runs_every_case() -> None:
    rows = worker.run(quick=True)
    assert {(r["kind"], r["size"], r["op"]) for r in rows} == {
        (k, s, op) for k in worker.KINDS for s in worker.SIZES for op in ("encap", "decap")
    }
    for r in rows:
        assert r["worker_ns"] > 0 and r["bare_ns"] > 0 and r["kpps"] > 0
