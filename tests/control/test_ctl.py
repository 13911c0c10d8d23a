# ruff: noqa: F811
"""anywanctl against a running control: in-process ``main`` (in a thread, the
server on the test's loop) for every command, and the real console scripts
(``anywan-control init/keygen/token create/serve`` + ``anywanctl``) as
subprocesses, whose output is also checked for leaked secrets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control import ctl
from tests.control.api_support import Control, control  # noqa: F401

VENV_BIN = Path(sys.executable).parent


async def run_ctl(
    control: Control, capsys: pytest.CaptureFixture[str], *argv: str, token: str | None = None
) -> tuple[int, str, str]:
    args = ["--api", control.base, "--token", token or control.operator, "--account", "acct-a"]
    rc = await asyncio.to_thread(ctl.main, [*args, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


async def test_anywanctl_commands(control: Control, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run_ctl(
        control, capsys, "tunnels", "create", "site1", "--anycast", "203.0.113.1",
        "--customer-endpoint", "198.51.100.7", "--interface-address", "10.100.0.0/31",
    )  # fmt: skip
    assert rc == 0, err
    assert "remote_identities" in out and "fqdn_id:" in out
    rc, out, _ = await run_ctl(control, capsys, "--json", "tunnels", "list")
    (t,) = json.loads(out)
    assert t["name"] == "site1" and t["kind"] == "ipsec"
    tid = t["id"]
    rc, out, _ = await run_ctl(control, capsys, "tunnels", "list")
    assert out.splitlines()[0].split()[:3] == ["ID", "NAME", "CLOUDFLARE_ENDPOINT"]
    assert tid in out and "site1" in out
    rc, out, _ = await run_ctl(control, capsys, "tunnels", "show", tid)
    assert rc == 0 and f"id: {tid}" in out and "kind: ipsec" in out

    rc, out, err = await run_ctl(control, capsys, "psk", "generate", tid)
    psk = out.splitlines()[0]
    assert rc == 0 and control.store.get_psk("acct-a", tid) == psk.encode()

    rc, out, err = await run_ctl(
        control, capsys, "tunnels", "create", "gre1", "--gre", "--anycast", "203.0.113.2",
        "--customer-endpoint", "198.51.100.8", "--interface-address", "10.100.0.2/31",
        "--ttl", "32",
    )  # fmt: skip
    assert rc == 0, err
    rc, out, _ = await run_ctl(control, capsys, "routes", "add", "10.50.0.0/16", "10.100.0.1")
    assert rc == 0 and f"tunnel_id: {tid}" in out
    rid = next(line.split()[1] for line in out.splitlines() if line.startswith("id:"))
    rc, out, _ = await run_ctl(control, capsys, "routes", "list")
    assert rid in out and "10.50.0.0/16" in out
    rc, out, _ = await run_ctl(control, capsys, "sas", tid)
    assert rc == 0 and "IKE SAs:" in out and "Child SAs:" in out
    rc, out, _ = await run_ctl(control, capsys, "workers")
    assert rc == 0 and "no live workers" in out
    rc, out, _ = await run_ctl(control, capsys, "status")
    assert rc == 0 and "control: ok" in out and "acct-a" in out

    # Errors say what is wrong, with the field, and exit non-zero.
    rc, out, err = await run_ctl(
        control, capsys, "tunnels", "create", "x", "--anycast", "203.0.113.1",
        "--interface-address", "10.9.9.0/24",
    )  # fmt: skip
    assert rc == ctl.EXIT_API and "interface_address" in err and "/31 or a /30" in err
    rc, out, err = await run_ctl(control, capsys, "routes", "add", "10.60.0.0/16", "10.99.0.1")
    assert rc == ctl.EXIT_API and "nexthop" in err and "HTTP 400" in err
    rc, out, err = await run_ctl(control, capsys, "tunnels", "delete", tid)
    assert rc == ctl.EXIT_API and "HTTP 409" in err and rid in err
    rc, out, err = await run_ctl(control, capsys, "tunnels", "show", "f" * 32)
    assert rc == ctl.EXIT_API and "not found" in err
    rc, out, err = await run_ctl(control, capsys, "tunnels", "list", token="wrong")
    assert rc == ctl.EXIT_AUTH and "ANYWAN_TOKEN" in err
    rc = await asyncio.to_thread(ctl.main, ["--api", "http://127.0.0.1:9", "status"])
    assert rc == ctl.EXIT_UNREACHABLE and "cannot reach" in capsys.readouterr().err
    rc = await asyncio.to_thread(
        ctl.main, ["--api", control.base, "--token", "t", "routes", "list"]
    )
    assert rc == ctl.EXIT_USAGE and "--account" in capsys.readouterr().err

    rc, out, _ = await run_ctl(control, capsys, "routes", "delete", rid)
    assert rc == 0 and out.strip() == f"deleted {rid}"
    rc, out, _ = await run_ctl(control, capsys, "tunnels", "delete", "--validate-only", tid)
    assert rc == 0 and out.strip() == f"would delete {tid}"
    rc, out, _ = await run_ctl(control, capsys, "tunnels", "delete", tid)
    assert rc == 0 and control.store.get("ipsec", "acct-a", tid) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>bad gateway</html>", "not a JSON answer"),
        (b"[1, 2]", "not a JSON answer"),
        (b'{"success": false, "errors": ["odd", {"code": 1, "message": "x"}]}', "odd; x"),
    ],
)
def test_odd_answers_are_errors_not_tracebacks(body: bytes, message: str) -> None:
    """What a proxy or another server may answer: a clear error, exit code 1."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(502)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        client = ctl.Client(f"http://127.0.0.1:{srv.server_port}", "t", 5.0)
        with pytest.raises(ctl.CtlError, match=message) as exc:
            client.call("GET", "/accounts")
        assert exc.value.code == ctl.EXIT_API
    finally:
        srv.shutdown()
        srv.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


def test_console_scripts_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "ANYWAN_STATE_DIR": str(tmp_path / "state"),
        "ANYWAN_API_LISTEN": f"127.0.0.1:{port}",
        "ANYWAN_BUS_SNAPSHOT_ENDPOINT": f"ipc://{tmp_path}/snap",
        "ANYWAN_BUS_UPDATE_ENDPOINT": f"ipc://{tmp_path}/upd",
        "ANYWAN_BUS_ACK_ENDPOINT": f"ipc://{tmp_path}/ack",
        "ANYWAN_RELAY_ENDPOINT": f"ipc://{tmp_path}/relay",
    }
    control_bin, ctl_bin = str(VENV_BIN / "anywan-control"), str(VENV_BIN / "anywanctl")
    r = run([control_bin, "serve"], env)
    assert r.returncode == 1 and "keygen" in r.stderr  # no bus keys yet: says what to do
    assert run([control_bin, "init"], env).returncode == 0
    assert (tmp_path / "state" / "master.key").stat().st_mode & 0o777 == 0o600
    assert run([control_bin, "keygen"], env).returncode == 0
    r = run([control_bin, "token", "create", "--account", "acct-a", "--description", "e2e"], env)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.startswith("awt_") and token not in r.stderr
    r = run([control_bin, "token", "create", "--account", "bad account"], env)
    assert r.returncode == 2 and "not a valid account" in r.stderr
    r = run([control_bin, "token", "list"], env)
    assert "acct-a" in r.stdout and token not in r.stdout

    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([control_bin, "--log-level", "debug", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        cenv = {**env, "ANYWAN_API": f"http://127.0.0.1:{port}", "ANYWAN_TOKEN": token,
                "ANYWAN_ACCOUNT": "acct-a", "SITE_PSK": "e2e-psk-Tq7x9Lw2"}  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            r = run([ctl_bin, "status"], cenv)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            assert proc.poll() is None, "control exited"
            time.sleep(0.2)
        assert r.returncode == 0, r.stderr
        assert "ike running" in r.stdout  # the engine is fed by the worker relay
        r = run([ctl_bin, "--json", "tunnels", "create", "s1", "--anycast", "203.0.113.1",
                 "--interface-address", "10.0.0.0/31", "--psk-env", "SITE_PSK"], cenv)  # fmt: skip
        assert r.returncode == 0, r.stderr
        tid = json.loads(r.stdout)["id"]
        r = run([ctl_bin, "psk", "generate", tid], cenv)
        assert r.returncode == 0
        generated = r.stdout.splitlines()[0]
        r = run([ctl_bin, "--json", "tunnels", "show", tid], cenv)
        assert json.loads(r.stdout)["psk_metadata"]["last_generated_on"]
        assert generated not in r.stdout and "e2e-psk" not in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log.seek(0)
    text = log.read()
    assert "listening on http://127.0.0.1" in text  # the debug log really was captured
    for secret in (token, generated, "e2e-psk-Tq7x9Lw2"):
        assert secret not in text
    for f in (tmp_path / "state").iterdir():
        if f.is_file() and f.name != "master.key":
            data = f.read_bytes()
            assert generated.encode() not in data and b"e2e-psk" not in data
            assert token.encode() not in data

    # Restart keeps the tunnel (and its PSK) from the same database.
    r = run([control_bin, "token", "create", "--operator"], env)
    op = r.stdout.strip()
    proc = subprocess.Popen([control_bin, "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        cenv = {**env, "ANYWAN_API": f"http://127.0.0.1:{port}", "ANYWAN_TOKEN": op}
        deadline = time.monotonic() + 15
        while True:
            r = run([ctl_bin, "--account", "acct-a", "--json", "tunnels", "list"], cenv)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [t["id"] for t in json.loads(r.stdout)] == [tid]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
