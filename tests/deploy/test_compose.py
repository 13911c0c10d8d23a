"""The docker-compose cluster, checked statically (there is no Docker engine
on our machines): Debian's docker-compose validates the file, the services
have the cluster's shape, the image is built by deploy/setup.sh, and the
containers use the lab's configuration files."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="needs Debian's docker-compose (deploy/setup.sh installs it)",
)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The file as docker-compose itself resolves it (anchors, merges, paths)."""
    if shutil.which("docker-compose") is None:
        pytest.skip("needs Debian's docker-compose (deploy/setup.sh installs it)")
    res = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    data: dict[str, Any] = yaml.safe_load(res.stdout)
    return data


@needs_compose
def test_docker_compose_config_is_valid() -> None:
    res = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr


def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validity check above can fail: a typo'd key is refused."""
    if shutil.which("docker-compose") is None:
        pytest.skip("needs Debian's docker-compose (deploy/setup.sh installs it)")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("cap_add:", "cap_addd:", 1))
    res = subprocess.run(
        ["docker-compose", "-f", str(bad), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0


def workers(services: dict[str, Any]) -> dict[str, Any]:
    return {
        name: svc
        for name, svc in services.items()
        if svc.get("command") and svc["command"][0] == "anywan-worker"
    }


def test_cluster_shape(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    control = [s for s in services.values() if s.get("hostname") == "control"]
    assert len(control) == 1
    script = ROOT / control[0]["command"][0].removeprefix("/opt/anywan/")
    assert re.search(r"exec anywan-control .* serve$", script.read_text(), re.M)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    ws = workers(services)
    assert len(ws) >= 2, "N >= 2 worker containers"
    for name, svc in ws.items():
        assert "NET_ADMIN" in svc.get("cap_add", []), name
        assert any(d.startswith("/dev/net/tun") for d in svc.get("devices", [])), name
    site = [s for s in services.values() if "site" in s.get("command", [])]
    assert site and all("/dev/net/tun:/dev/net/tun" in s["devices"] for s in site)
    assert any(s.get("command", [None])[0] == "prometheus" for s in services.values())
    assert any(s.get("image", "").startswith("grafana/") for s in services.values())


def test_commands_parse_with_the_real_command_lines(resolved: dict[str, Any]) -> None:
    """Every anywan-worker and `python -m deploy.lab` command in the file is
    accepted by the argument parser of the code it runs."""
    from dataplane import cli as worker_cli
    from deploy import lab

    seen = 0
    for name, svc in resolved["services"].items():
        cmd = svc.get("command") or []
        if cmd[:1] == ["anywan-worker"]:
            worker_cli.build_parser().parse_args(cmd[1:])
            seen += 1
        elif cmd[:3] == ["python", "-m", "deploy.lab"]:
            args = lab.build_parser().parse_args(cmd[3:])
            assert args.command in ("site", "provision", "core-services"), name
            if args.command in ("site", "provision"):
                cfg = lab.LabConfig.load(DEPLOY / "lab.toml")
                assert args.name in {s.name for s in cfg.sites}, name
            seen += 1
    assert seen >= 5


def test_every_worker_carries_the_anycast_address_and_the_edge_spreads_to_all(
    resolved: dict[str, Any],
) -> None:
    lab = tomllib.loads((DEPLOY / "lab.toml").read_text())
    services = resolved["services"]
    ws = workers(services)
    anycast = lab["anycast"]
    addrs = []
    for name, svc in ws.items():
        assert svc["environment"]["ANYWAN_LOOPBACK"] == f"{anycast}/32", name
        addrs.append(svc["networks"]["anycast"]["ipv4_address"])
    edge = services["edge"]
    route = edge["environment"]["ANYWAN_ROUTES"]
    assert route.startswith(f"{anycast}/32 ")
    assert sorted(re.findall(r"nexthop via (\S+)", route)) == sorted(addrs)
    assert edge["sysctls"]["net.ipv4.fib_multipath_hash_policy"] == str(lab["edge"]["hash_policy"])
    assert edge["sysctls"]["net.ipv4.fib_multipath_hash_fields"] == lab["edge"]["hash_fields"]


def test_prometheus_scrapes_control_and_every_worker(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    targets_dir = DEPLOY / "prometheus" / "compose-targets"
    worker_targets = {
        t.split(":")[0]
        for group in json.loads((targets_dir / "worker.json").read_text())
        for t in group["targets"]
    }
    mgmt_of = {
        name: svc["networks"]["mgmt"]["ipv4_address"] for name, svc in workers(services).items()
    }
    assert worker_targets == set(mgmt_of.values())
    control_targets = [
        t for g in json.loads((targets_dir / "control.json").read_text()) for t in g["targets"]
    ]
    assert control_targets == [f"{services['control']['networks']['mgmt']['ipv4_address']}:9100"]
    # Every address used is inside its network's subnet.
    subnets = {
        name: ipaddress.ip_network(net["ipam"]["config"][0]["subnet"])
        for name, net in resolved["networks"].items()
    }
    for svc in services.values():
        for net, spec in (svc.get("networks") or {}).items():
            if spec and spec.get("ipv4_address"):
                assert ipaddress.ip_address(spec["ipv4_address"]) in subnets[net]


def test_containers_use_the_lab_configuration_files(resolved: dict[str, Any]) -> None:
    services = resolved["services"]

    def mounts(svc: dict[str, Any]) -> dict[str, str]:
        out = {}
        for v in svc.get("volumes", []):
            if isinstance(v, dict):
                out[v["target"]] = v.get("source", "")
            else:
                src, dst = v.split(":")[:2]
                out[dst] = src
        return out

    prom = next(s for s in services.values() if s.get("command", [None])[0] == "prometheus")
    m = mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    assert Path(m[config_arg.split("=", 1)[1]]) == DEPLOY / "prometheus" / "prometheus.yml"
    graf = next(s for s in services.values() if s.get("image", "").startswith("grafana/"))
    assert DEPLOY / "grafana" / "provisioning" in {Path(p) for p in mounts(graf).values()}
    for name in ("control", *workers(services)):
        assert Path(mounts(services[name])["/etc/anywan/lab.toml"]) == DEPLOY / "lab.toml"


def test_dockerfile_installs_with_setup_sh_only() -> None:
    """The image is built by the README's install step, nothing else."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM debian:bookworm")
    runs = [ln for ln in lines if ln.startswith("RUN ")]
    assert runs, "the Dockerfile installs something"
    for run in runs:
        assert "bash deploy/setup.sh" in run, run
        assert not re.search(r"\b(apt-get install|pip install)\b", run), run
    # setup.sh itself installs everything the lab needs: python, strongSwan,
    # iperf3, nftables and the Prometheus the lab runs.
    setup = (DEPLOY / "setup.sh").read_text()
    block = re.search(r"^APT_PACKAGES=\((.*?)^\)", setup, re.S | re.M).group(1)  # type: ignore[union-attr]
    pkgs = {w for line in block.splitlines() for w in line.split("#")[0].split()}
    for need in (
        "python3",
        "python3-venv",
        "strongswan-charon",
        "iperf3",
        "nftables",
        "prometheus",
    ):
        assert need in pkgs, need
    entry = re.search(r'ENTRYPOINT \["([^"]+)"', text).group(1)  # type: ignore[union-attr]
    script = ROOT / entry.removeprefix("/opt/anywan/")
    assert script.exists() and script.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0


def test_dockerignore_keeps_the_local_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


@needs_compose
def test_control_healthcheck_fails_on_a_degraded_control(resolved: dict[str, Any]) -> None:
    """Control's healthcheck asks /healthz on the port control listens on
    (deploy/config/anywan.toml) and fails when it answers 503 ("degraded");
    no service waits for control to be healthy (with tunnels configured,
    control reports its missing workers, so they would never start). The
    check's own command runs here against a stand-in that answers 200 or 503."""
    import http.server
    import sys
    import threading

    services = resolved["services"]
    (control,) = [s for s in services.values() if s.get("hostname") == "control"]
    test = control["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    conf = tomllib.loads((DEPLOY / "config" / "anywan.toml").read_text())
    port = int(conf["control"]["api_listen"].rsplit(":", 1)[1])
    assert f"http://127.0.0.1:{port}/healthz" in code
    for name, svc in services.items():
        dep = svc.get("depends_on", {})
        cond = dep.get("control", {}).get("condition") if isinstance(dep, dict) else None
        assert cond != "service_healthy", name
    status = {"code": 200}

    class Healthz(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/healthz"
            self.send_response(status["code"] if ok else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        local = code.replace(f"127.0.0.1:{port}", f"127.0.0.1:{srv.server_port}")
        run = [sys.executable, "-c", local]
        assert subprocess.run(run, capture_output=True, timeout=20).returncode == 0
        status["code"] = 503
        assert subprocess.run(run, capture_output=True, timeout=20).returncode != 0
    finally:
        srv.shutdown()
        srv.server_close()
