"""``python -m bench.codec --quick`` runs and reports every ESP case (no thresholds:
numbers belong in bench/, not in timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_codec_quick_reports_all_esp_cases() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.codec", "--quick", "--json", "--iterations", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["rows"]
    esp = {(r["case"], r["size"], r["op"]) for r in rows if r["suite"] == "esp"}
    for size in (64, 1400):
        for case in ("aes128gcm16", "aes256gcm16", "aes256+sha256_128", "null+sha1_96"):
            assert {(case, size, "encap"), (case, size, "decap")} <= esp
        for case in ("aes128gcm16 in-place", "aes256gcm16 in-place", "null+sha256_128 in-place"):
            assert {(case, size, "encap"), (case, size, "decap")} <= esp
    assert all(r["ns_per_packet"] > 0 and r["ratio"] > 0 for r in rows)
    assert report["meta"]["cryptography"]
