"""``anywan-worker`` startup errors say what to fix; options from flags/env/TOML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.cli import build_parser, resolve

from ._worker_netns_names import sweep_dead, unique_prefix

ROOT = Path(__file__).resolve().parents[2]
PREFIX = unique_prefix("cli")


@pytest.fixture(autouse=True, scope="module")
def _sweep_crashed_runs() -> None:
    sweep_dead("cli")


def test_precedence_flag_env_toml_default(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('[worker]\nanycast = "192.0.2.1"\nmetrics_port = 9500\ntun_mtu = 1400\n')
    args = build_parser().parse_args(["--config", str(cfg), "--tun-mtu", "1300"])
    o = resolve(args, {"ANYWAN_METRICS_PORT": "9600"})
    assert (o["anycast"], o["metrics_port"], o["tun_mtu"], o["index"]) == (
        "192.0.2.1", 9600, 1300, 0,
    )  # fmt: skip


def _run(argv: list[str], *, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "dataplane.cli", *argv],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip


def test_config_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[worker]\nanycats = '1.2.3.4'\n")
    res = _run(["--config", str(bad)])
    assert res.returncode == 2 and "unknown keys" in res.stderr and "anycats" in res.stderr
    res = _run([])
    assert res.returncode == 2 and "--anycast" in res.stderr


@pytest.mark.netns
def test_startup_errors_in_a_namespace(netns_topology, tmp_path: Path) -> None:
    from replication import curve

    topo = netns_topology(PREFIX)
    node = topo.namespace("node")
    common = ["--netns", node.name, "--run-dir", str(tmp_path / "run"), "--metrics-port", "0"]
    # address not present
    res = _run(["--anycast", "192.0.2.50", *common])
    assert res.returncode == 2, res.stderr
    assert "address not present" in res.stderr and "192.0.2.50" in res.stderr
    # bus unreachable
    node.addr("lo", "192.0.2.50/32")
    curve.generate_keypair(tmp_path, "control")
    curve.generate_keypair(tmp_path, "worker")
    bus = [
        "--bus-snapshot", f"ipc://{tmp_path}/none1", "--bus-updates", f"ipc://{tmp_path}/none2",
        "--bus-acks", f"ipc://{tmp_path}/none3", "--bus-server-key", str(tmp_path / "control.pub"),
        "--bus-client-key", str(tmp_path / "worker.key"), "--bus-timeout", "1",
    ]  # fmt: skip
    res = _run(["--anycast", "192.0.2.50", *common, *bus])
    assert res.returncode == 2, res.stderr
    assert "bus unreachable" in res.stderr
    # no TUN permission: an unprivileged user in the namespace
    res = _run(
        ["--anycast", "192.0.2.50", "--listen", "udp4500", "--run-dir", str(tmp_path / "run2"),
         "--metrics-port", "0"],
        prefix=["ip", "netns", "exec", node.name, "setpriv", "--reuid=65534", "--regid=65534",
                "--clear-groups"],
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "tun" in res.stderr.lower() and "permission" in res.stderr
    # and a worker that can start runs, then stops cleanly at --duration
    res = _run(["--anycast", "192.0.2.50", *common, "--duration", "0.5"])
    assert res.returncode == 0, res.stderr
