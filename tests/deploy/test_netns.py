"""deploy/netns.py against the kernel: namespaces, veth, ECMP, sysctls,
process tracking and cleanup (netns prefix ``awt-i-d-``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from deploy.netns import (
    NetnsError,
    Topology,
    cleanup_prefix,
    list_namespaces,
    namespace_pids,
    topology,
    unique_prefix,
)

pytestmark = pytest.mark.netns
BASE = "awt-i-d-"
PREFIX = unique_prefix(BASE)  # this run's own: parallel runs do not collide

# A UDP server that counts datagrams and prints the count when stdin closes
# or after `secs` seconds; a client that sends one datagram per source port.
UDP_COUNTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2]))); s.settimeout(0.1)
print("ready", flush=True)
n, end = 0, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(2048)
    except socket.timeout:
        continue
    if data == b"stop":
        break
    n += 1
    s.sendto(data, peer)
print(n, flush=True)
"""

UDP_SENDER = """
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ok = 0
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.bind(("0.0.0.0", 20000 + i))
    s.sendto(b"x%d" % i, (dst, port))
    try:
        s.recvfrom(100); ok += 1
    except socket.timeout:
        pass
    s.close()
print(ok)
"""


def pid_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_counter(ns, addr: str, port: int, secs: float = 20.0) -> subprocess.Popen[str]:
    proc = ns.popen(
        [sys.executable, "-c", UDP_COUNTER, addr, str(port), str(secs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop_counter(ns, proc: subprocess.Popen[str], addr: str, port: int) -> int:
    ns.run(
        [
            sys.executable,
            "-c",
            f"import socket; socket.socket(2,2).sendto(b'stop', ({addr!r}, {port}))",
        ]
    )
    out, _ = proc.communicate(timeout=5)
    return int(out.strip())


def test_veth_addresses_and_traffic(netns_topology) -> None:
    topo: Topology = netns_topology(BASE)
    a, b = topo.namespace("a"), topo.namespace("b")
    topo.veth(a, "a0", b, "b0", addr_a="10.99.0.1/24", addr_b="10.99.0.2/24")
    assert "10.99.0.1/24" in a.addresses("a0")
    assert a.name in list_namespaces(PREFIX)
    srv = start_counter(b, "10.99.0.2", 7000)
    res = a.run([sys.executable, "-c", UDP_SENDER, "10.99.0.2", "7000", "5"])
    assert res.stdout.strip() == "5"
    assert stop_counter(a, srv, "10.99.0.2", 7000) == 5
    # The root namespace does not see the namespace's address.
    assert "10.99.0.1/24" not in topo.root.addresses()


def test_ecmp_multipath_spreads_udp_flows_by_port(netns_topology) -> None:
    """An edge router with an L4-hash multipath route to two nodes that both
    own the same (anycast) address: flows with different source ports land on
    both nodes, and each flow gets its replies."""
    topo: Topology = netns_topology(BASE)
    client, edge = topo.namespace("cl"), topo.namespace("edge")
    n1, n2 = topo.namespace("n1"), topo.namespace("n2")
    topo.veth(client, "c0", edge, "e0", addr_a="10.98.0.2/24", addr_b="10.98.0.1/24")
    client.route("default", via="10.98.0.1")
    edge.enable_forwarding(multipath_hash_policy=1)
    assert edge.sysctl("net.ipv4.fib_multipath_hash_policy") == "1"
    for i, node in enumerate((n1, n2), start=1):
        topo.veth(edge, f"e{i}", node, "up0", addr_a=f"10.97.{i}.1/24", addr_b=f"10.97.{i}.2/24")
        node.addr("lo", "203.0.113.1/32")
        node.route("default", via=f"10.97.{i}.1")
    edge.route("203.0.113.1/32", multipath=[("10.97.1.2", 1), ("10.97.2.2", 1)])
    (route,) = [r for r in edge.routes() if r["dst"] == "203.0.113.1/32"]
    assert sorted(h[0] for h in route["multipath"]) == ["10.97.1.2", "10.97.2.2"]
    servers = [start_counter(n, "203.0.113.1", 4500) for n in (n1, n2)]
    res = client.run([sys.executable, "-c", UDP_SENDER, "203.0.113.1", "4500", "40"])
    assert res.stdout.strip() == "40"
    counts = [
        stop_counter(n, s, "203.0.113.1", 4500) for n, s in zip((n1, n2), servers, strict=True)
    ]
    # "stop" from inside each node goes to its own server; both nodes carried flows.
    assert sum(counts) == 40
    assert min(counts) > 0, counts


def test_sysctl_is_per_namespace(netns_topology) -> None:
    topo: Topology = netns_topology(BASE)
    a = topo.namespace("a")
    before = topo.root.sysctl("net.ipv4.ip_forward")
    a.sysctl("net.ipv4.ip_forward", 1)
    assert a.sysctl("net.ipv4.ip_forward") == "1"
    assert a.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert topo.root.sysctl("net.ipv4.ip_forward") == before


def test_root_veth_end_is_removed(netns_topology) -> None:
    topo: Topology = netns_topology(BASE)
    a = topo.namespace("a")
    topo.veth(topo.root, "awtid-r0", a, "a0", addr_a="10.96.0.1/30", addr_b="10.96.0.2/30")
    assert topo.root.ipr.link_lookup(ifname="awtid-r0")
    topo.close()
    probe = Topology(PREFIX)
    try:
        assert not probe.root.ipr.link_lookup(ifname="awtid-r0")
    finally:
        probe.close()


def test_close_ends_processes_and_namespaces_after_error() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), topology(PREFIX) as topo:
        a = topo.namespace("a")
        p = a.popen(["sleep", "60"])
        # A process the topology did not start itself, still inside the namespace.
        a.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])
        time.sleep(0.2)
        pids = namespace_pids(a.name)
        assert p.pid in pids and len(pids) >= 2
        raise RuntimeError("boom")
    assert not list_namespaces(PREFIX)
    assert not [pid for pid in pids if pid_alive(pid)]


def test_cleanup_prefix_removes_leftovers_of_a_crashed_run() -> None:
    topo = Topology(PREFIX)
    a = topo.namespace("crashed")
    a.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"])
    (pid,) = namespace_pids(a.name)
    a.close()
    # Simulate a crash: the Topology object is forgotten without close().
    topo._closed = True
    assert cleanup_prefix(PREFIX) == [PREFIX + "crashed"]
    assert not list_namespaces(PREFIX)
    assert not pid_alive(pid)
    with pytest.raises(ValueError):
        cleanup_prefix("aw")


def test_duplicate_namespace_and_bad_interface_are_errors(netns_topology) -> None:
    topo: Topology = netns_topology(BASE)
    a = topo.namespace("a")
    assert topo.namespace("a") is a
    other = Topology(PREFIX)
    try:
        with pytest.raises(NetnsError, match="exists already"):
            other.namespace("a")
    finally:
        other.close()
    with pytest.raises(NetnsError, match="no interface"):
        a.up("nope0")
    with pytest.raises(NetnsError, match="exited"):
        a.run(["false"])


def test_unique_prefix_sweeps_only_dead_runs() -> None:
    from pyroute2 import netns as pr_netns

    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "30"])
    base = "awt-i-u-"
    try:
        pr_netns.create(f"{base}{dead.pid}-x")
        pr_netns.create(f"{base}{alive.pid}-x")
        mine = unique_prefix(base)
        assert mine == f"{base}{os.getpid()}-"
        assert list_namespaces(base) == [f"{base}{alive.pid}-x"]
    finally:
        alive.kill()
        alive.wait()
        cleanup_prefix(base)


def test_capture_start_is_bounded(netns_topology, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tcpdump that fails or never says "listening" is an error within the
    bound, and the process is ended (it would otherwise block readline)."""
    import deploy.netns

    topo: Topology = netns_topology(BASE)
    a = topo.namespace("cap")
    with pytest.raises(NetnsError, match="tcpdump did not start"):
        a.capture("nosuch0", "/dev/null")
    monkeypatch.setattr(deploy.netns, "CAPTURE_START_TIMEOUT", 0.5)
    monkeypatch.setattr(a, "command", lambda argv: ["sleep", "30"])  # silent, never listens
    t0 = time.monotonic()
    with pytest.raises(NetnsError, match="tcpdump did not start"):
        a.capture("lo", "/dev/null")
    assert time.monotonic() - t0 < 5
    stuck = topo.processes[-1]
    assert stuck.poll() is not None
