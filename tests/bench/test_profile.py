"""bench.profile: the perf-script classifier, and a --quick run through netns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import profile

ROOT = Path(__file__).resolve().parents[2]

# perf script -F tid,ip,sym,dso output (abridged from a real worker sample run)
PERF_SCRIPT = """\
  4242 \n\
\tffffffff81a0 tcp_v4_rcv+0x5 ([kernel.kallsyms])
\tffffffff81a1 ip_local_deliver+0x10 ([kernel.kallsyms])
\tffffffff81a2 __netif_receive_skb_core+0x10 ([kernel.kallsyms])
\tffffffff81a3 tun_get_user+0x300 ([kernel.kallsyms])
\tffffffff81a4 tun_chr_write_iter+0x50 ([kernel.kallsyms])
\tffffffff81a5 vfs_write+0x50 ([kernel.kallsyms])
\tffffffff81a6 do_syscall_64+0x50 ([kernel.kallsyms])
\t          f8350 __GI___libc_write (/usr/lib/x86_64-linux-gnu/libc.so.6)

  4242 \n\
\t         1234 aesni_gcm_decrypt+0x10 (/venv/cryptography/hazmat/bindings/_rust.abi3.so)

  4242 \n\
\t         5678 _PyEval_EvalFrameDefault+0x100 (/usr/bin/python3.11)

  4242 \n\
\tffffffff81b0 copy_user_generic+0x5 ([kernel.kallsyms])
\tffffffff81b1 _copy_to_iter+0x5 ([kernel.kallsyms])
\tffffffff81b2 udp_recvmsg+0x5 ([kernel.kallsyms])
\tffffffff81b3 ____sys_recvmsg+0x5 ([kernel.kallsyms])
\tffffffff81b4 ___sys_recvmsg+0x5 ([kernel.kallsyms])
\tffffffff81b5 __sys_recvmsg+0x5 ([kernel.kallsyms])

  4243 \n\
\t         5678 _PyEval_EvalFrameDefault+0x100 (/usr/bin/python3.11)
"""


def test_classify_and_summarize() -> None:
    samples = profile.parse_perf_script(PERF_SCRIPT)
    assert [tid for tid, _ in samples] == [4242, 4242, 4242, 4242, 4243]
    assert profile.classify(samples[0][1])[:2] == ("tun_write", "inner TCP receive (core's socket)")
    assert profile.classify(samples[1][1])[0] == "crypto"
    assert profile.classify(samples[2][1])[0] == "python"
    assert profile.classify(samples[3][1])[:2] == ("socket_recv", "copy to user")
    s = profile.summarize(samples, 4242, period_ns=1000)
    assert s["samples"] == 4 and s["other_thread_samples"] == 1
    assert s["stages"]["tun_write"]["pct"] == 25.0
    assert sum(v["pct"] for v in s["stages"].values()) == pytest.approx(100.0)


def test_perf_stat_parse() -> None:
    text = "1234,,syscalls:sys_enter_write,100.0,5000,100.00,,\n<not counted>,,syscalls:x,,\n"
    assert profile.parse_perf_stat(text) == {"write": 1234}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns)")


@pytest.mark.netns
@pytest.mark.strongswan
@needs_root
@pytest.mark.skipif(shutil.which("perf") is None, reason="needs Linux perf (linux-perf)")
@pytest.mark.skipif(
    shutil.which("charon") is None and not os.path.exists("/usr/lib/ipsec/charon"),
    reason="needs strongSwan charon",
)
def test_quick_run_profiles_both_directions(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    env = {**os.environ, "ANYWAN_BENCH_NETNS_PREFIX": "awt-p-"}
    res = subprocess.run(
        [sys.executable, "-m", "bench.profile", "--quick", "--seconds", "2.5", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if "stages" in r]
    assert {r["test"] for r in rows} == {"tcp-up", "tcp-down"}, data["rows"]
    for r in rows:
        assert set(r["stages"]) == set(profile.STAGES)
        assert r["samples"] > 50
        assert sum(v["pct"] for v in r["stages"].values()) == pytest.approx(100.0, abs=0.5)
        assert r["value"] > 0 and r["kpps"] > 0
        # a worker carrying traffic spends time in the TUN write, the cipher and Python
        for st in ("tun_write", "crypto", "python"):
            assert r["stages"][st]["pct"] > 0, (st, r["stages"])
    md = profile.markdown(data)
    assert md[0].startswith("## ") and any(line.startswith("| stage |") for line in md)
