"""``python -m bench.codec --suite gre --quick`` runs and reports every GRE/IP case
(no thresholds: numbers belong in bench/ and the README, not in timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_codec_quick_reports_the_gre_suite() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.codec", "--quick", "--json", "--suite", "gre",
         "--iterations", "20", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    gre = {(r["case"], r["size"], r["op"]) for r in rows if r["suite"] == "gre"}
    for size in (64, 1400):
        for case in ("gre", "gre key", "gre key+seq+csum"):
            assert {(case, size, "encap"), (case, size, "decap")} <= gre
        assert ("clamp_mss SYN 1460->1360", size, "mss") in gre
    assert ("fragment_ipv4 to 576", 1400, "pmtu") in gre
    assert all(r["ns_per_packet"] > 0 and r["ratio"] > 0 for r in rows)
    assert not any(r["suite"] == "esp" for r in rows)
