"""The netns lab end to end: ``deploy.lab`` brings the whole system up once
for this module (namespace prefix ``awt-l-``), real customer routers send
real traffic, and the lab is always torn down afterwards.

Tests that need a part of anywan this checkout cannot run yet skip with the
reason ``deploy.lab`` found (it names the module); everything else runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab import (
    DEFAULT_CONFIG,
    Lab,
    LabConfig,
    down,
    http_get,
    ns_exec,
    print_status,
    site_connection,
    status,
)
from deploy.netns import list_namespaces, unique_prefix

BASE = "awt-l-lab-"
pytestmark = [pytest.mark.netns, pytest.mark.strongswan]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # A prefix of this test process's own (deploy.netns.unique_prefix), so two
    # runs on one machine never sweep each other.
    prefix = unique_prefix(BASE)
    run_dir = Path(f"/var/tmp/anywan-{prefix.rstrip('-')}")
    cfg = LabConfig.load(prefix=prefix, run_dir=run_dir, host_link=False, workers_per_node=2)
    lab = Lab(cfg, log=lambda _msg: None)
    try:
        lab.up()
        # Warm-up: the first packets right after IKE_AUTH may beat the new
        # SA to some workers (bus propagation); the tests measure after that.
        for st in lab.sites.values():
            if st.status in ("IKE SA established", "GRE router running"):
                ns_exec(
                    lan(lab, st.site.name),
                    ["ping", "-c", "3", "-i", "0.2", "-W", "1", lab.cfg.core_addr],
                )
        yield lab
    finally:
        lab.down()
        assert not list_namespaces(prefix), "down left namespaces behind"
        assert not run_dir.exists()


# -- helpers -----------------------------------------------------------------


def need(lab: Lab, *parts: str) -> None:
    for part in parts:
        if part in lab.missing:
            pytest.skip(f"needs {part}: {lab.missing[part]}")


def need_site(lab: Lab, name: str) -> None:
    st = lab.sites[name]
    if st.site.kind == "ipsec":
        need(lab, "control", "worker", "ike")
        if st.status != "IKE SA established":
            pytest.fail(f"{name}: {st.status}")
    else:
        need(lab, "control", "worker")


def lan(lab: Lab, site: str) -> str:
    return lab.cfg.ns(f"{site}-lan")


def ping(lab: Lab, src_ns: str, dst: str, count: int = 5, interval: float = 0.1) -> tuple[int, int]:
    res = ns_exec(
        src_ns,
        ["ping", "-q", "-c", str(count), "-i", str(interval), "-W", "1", dst],
        timeout=count * interval + 10,
    )
    m = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
    assert m, res.stdout + res.stderr
    return int(m.group(1)), int(m.group(2))


def iperf(lab: Lab, src_ns: str, port: int, *args: str, secs: int = 2) -> dict:
    res = ns_exec(
        src_ns,
        ["iperf3", "-c", lab.cfg.core_addr, "-p", str(port), "-t", str(secs), "-J", *args],
        timeout=secs + 20,
    )
    data = json.loads(res.stdout)
    assert "error" not in data, data.get("error")
    return data


def background_traffic(
    src: str,
    dst: str,
    *,
    pings: int,
    secs: int,
    interval: float = 0.01,
    ping_flags: tuple[str, ...] = ("-q",),
) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    """The traffic the failover, rekey and restart tests run under: a fast
    ping and an iperf3 TCP flow (the core's port 5203) from ``src`` to ``dst``,
    started in the background; the caller collects both outputs."""
    pinger = subprocess.Popen(
        ["ip", "netns", "exec", src, "ping", *ping_flags, "-c", str(pings),
         "-i", str(interval), "-W", "1", dst],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    tcp = subprocess.Popen(
        ["ip", "netns", "exec", src, "iperf3", "-c", dst, "-p", "5203", "-t", str(secs), "-J"],
        stdout=subprocess.PIPE,
        text=True,
    )
    return pinger, tcp


def scrape(lab: Lab, url: str) -> dict[str, float]:
    code, body = http_get(lab.cfg.ns("control"), url, 2.0)
    assert code == 200, (url, code)
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def worker_ids(lab: Lab) -> list[tuple[str, int, int, str]]:
    cfg = lab.cfg
    return [
        (
            lab.worker_name(k, i),
            k,
            i,
            f"http://{cfg.node_mgmt(k)}:{cfg.worker_metrics_port + i}/metrics",
        )
        for k in range(1, cfg.nodes + 1)
        for i in range(cfg.worker_count)
    ]


def tunnel_packets(lab: Lab, tunnel_id: str) -> dict[str, dict[str, float]]:
    """Per worker: inner packets of ``tunnel_id`` by direction."""
    account = next(st.site.account for st in lab.sites.values() if st.tunnel_id == tunnel_id)
    out = {}
    for name, _k, _i, url in worker_ids(lab):
        if lab.procs[name].poll() is not None:
            continue
        m = scrape(lab, url)
        out[name] = {
            d: m.get(
                f'anywan_worker_tunnel_packets_total{{account="{account}",'
                f'direction="{d}",tunnel="{tunnel_id}"}}',
                0.0,
            )
            for d in ("in", "out")
        }
    return out


def drops(lab: Lab) -> dict[str, float]:
    total: dict[str, float] = {}
    for name, _k, _i, url in worker_ids(lab):
        if lab.procs[name].poll() is not None:
            continue
        for key, value in scrape(lab, url).items():
            m = re.match(r'anywan_worker_drops_total\{reason="(\w+)"\}', key)
            if m:
                total[m.group(1)] = total.get(m.group(1), 0.0) + value
    return total


UDP_FLOWS = r"""
import socket, sys, time
dst, n, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 30000 + i))
    for _ in range(per):
        s.sendto(b"anywan-flow-%d" % i, (dst, 7000 + i))
        time.sleep(0.002)
    s.close()
"""


def udp_flows(lab: Lab, src_ns: str, flows: int = 16, per: int = 5) -> None:
    ns_exec(src_ns, [sys.executable, "-c", UDP_FLOWS, lab.cfg.core_addr, str(flows), str(per)], 60)


# -- the lab itself ------------------------------------------------------------


def test_up_runs_everything_it_reports(lab: Lab) -> None:
    st = status(lab.cfg)
    assert st["running"]
    dead = [n for n, s in st["processes"].items() if s != "running"]
    assert not dead, {n: lab.log_tail(n, 5) for n in dead}
    for part, why in lab.missing.items():
        # a missing part is named with the module that would provide it
        assert re.search(r"\w+/\w+\.py|needs ", why), (part, why)
    expected = {lab.cfg.ns(n) for n in ("edge", "control", "node1", "node2", "core", "siteA-lan")}
    assert expected <= set(st["namespaces"])


def test_down_cleans_up_after_a_crashed_up(tmp_path: Path) -> None:
    """An `up` that died half-way (namespaces, a process, a state file) is
    fully removed by `down`, even from a fresh process without the state."""
    cfg = LabConfig.load(
        prefix=unique_prefix("awt-l-x-"), run_dir=tmp_path / "run", host_link=False, sites=["siteC"]
    )
    from deploy.netns import Topology

    topo = Topology(cfg.prefix)
    a = topo.namespace("edge")
    topo.namespace("node1")
    proc = a.popen(["sleep", "60"])
    # `ip netns exec` enters the namespace, then execs sleep: wait for that,
    # or `down` may look for it there before it arrives (seen under load)
    comm = Path(f"/proc/{proc.pid}/comm")
    deadline = time.monotonic() + 5
    while comm.read_text().strip() != "sleep":
        assert time.monotonic() < deadline, comm.read_text()
        time.sleep(0.01)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "state.json").write_text(json.dumps({"pids": {}}))
    removed = down(cfg, quiet=True)
    assert proc.wait(timeout=5) is not None
    assert not list_namespaces(cfg.prefix)
    assert not (tmp_path / "run").exists()
    assert any(f"namespace {cfg.prefix}edge" in r for r in removed)


# -- traffic -------------------------------------------------------------------


def test_gre_site_reaches_the_core_icmp_tcp_udp_http(lab: Lab) -> None:
    need_site(lab, "siteC")
    src = lan(lab, "siteC")
    sent, got = ping(lab, src, lab.cfg.core_addr, 10, 0.05)
    assert got == sent
    tcp = iperf(lab, src, 5201, secs=2)
    assert tcp["end"]["sum_received"]["bytes"] > 1_000_000
    udp = iperf(lab, src, 5202, "-u", "-b", "20M", "-l", "1200", secs=2)
    assert udp["end"]["sum"]["packets"] > 1000
    assert udp["end"]["sum"]["lost_percent"] < 5
    res = ns_exec(src, ["curl", "-s", "-m", "3", f"http://{lab.cfg.core_addr}/"])
    assert "core of account acme" in res.stdout


def test_gre_site_carries_ipv6_both_ways(lab: Lab) -> None:
    """Site C has an IPv6 LAN (a route through control's API, IPv4 nexthop of
    the GRE tunnel): ping6 LAN -> core and core -> LAN, and the GRE router's
    counters and the workers' tunnel counters see it."""
    need_site(lab, "siteC")
    site = lab.sites["siteC"].site
    assert site.lan6 and site.lan6_host
    core_ns = lab.cfg.ns(next(a.core for a in lab.cfg.accounts if a.id == "acme"))
    tid = lab.sites["siteC"].tunnel_id
    before = sum(v.get("in", 0) for v in tunnel_packets(lab, tid).values())
    # from the core: sourced from its service address (the one the site routes)
    both = (
        (lan(lab, "siteC"), [lab.cfg.core_addr6]),
        (core_ns, ["-I", lab.cfg.core_addr6, site.lan6_host]),
    )
    for src, dst in both:
        res = ns_exec(src, ["ping", "-6", "-q", "-c", "10", "-i", "0.05", "-W", "1", *dst], 20)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
        assert m and m.group(1) == m.group(2) == "10", (src, dst, res.stdout, res.stderr)
    # 20 echo packets (10 requests, 10 replies) came in through the tunnel
    assert wait_for(
        lambda: sum(v.get("in", 0) for v in tunnel_packets(lab, tid).values()) - before >= 20, 5
    ), tunnel_packets(lab, tid)


@pytest.mark.parametrize("site", ["siteA", "siteB", "siteD"])
def test_ipsec_site_reaches_its_core(lab: Lab, site: str) -> None:
    need_site(lab, site)
    src = lan(lab, site)
    sent, got = ping(lab, src, lab.cfg.core_addr, 10, 0.05)
    assert got == sent
    tcp = iperf(lab, src, 5201, secs=2)
    assert tcp["end"]["sum_received"]["bytes"] > 1_000_000
    udp = iperf(lab, src, 5202, "-u", "-b", "10M", "-l", "1200", secs=2)
    assert udp["end"]["sum"]["lost_percent"] < 5
    account = lab.sites[site].site.account
    res = ns_exec(src, ["curl", "-s", "-m", "3", f"http://{lab.cfg.core_addr}/"])
    assert f"core of account {account}" in res.stdout


@pytest.mark.parametrize(("a", "b"), [("siteA", "siteB"), ("siteA", "siteC"), ("siteB", "siteC")])
def test_sites_reach_each_other(lab: Lab, a: str, b: str) -> None:
    need_site(lab, a)
    need_site(lab, b)
    dst = lab.sites[b].site.lan_host
    sent, got = ping(lab, lan(lab, a), dst, 5, 0.1)
    assert got == sent
    res = ns_exec(
        lan(lab, a),
        ["iperf3", "-c", dst, "-p", "5201", "-t", "1", "-J"],
        timeout=20,
    )
    # No iperf3 server on the site LANs: a refused TCP connection still proves
    # the TCP path both ways (SYN there, RST back).
    assert "Connection refused" in res.stdout or '"bytes"' in res.stdout


def test_strongswan_reports_sas_installed(lab: Lab) -> None:
    for name in ("siteA", "siteB", "siteD"):
        need_site(lab, name)
        sas = lab.sites[name].charon.established()
        assert len(sas) == 1, sas
        children = sas[0]["child-sas"]
        assert children and children[0]["state"] == "INSTALLED"
        assert children[0]["encap"] == "yes"
    # siteB is behind the NAT: anywan saw its public address, not 192.168.2.2
    sas = lab.sites["siteB"].charon.established()
    assert sas[0]["local-port"] == "4500"
    tid = lab.sites["siteB"].tunnel_id
    control = lab.api.call("GET", f"/accounts/acme/magic/ipsec_tunnels/{tid}/sas")
    nat_public = lab.sites["siteB"].site.public_addr
    assert {c["remote_addr"] for c in control["child_sas"]} == {nat_public}
    assert all(c["udp_encap"] for c in control["child_sas"])


def test_worker_metrics_count_the_packets(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    need_site(lab, "siteC")
    tid = lab.sites["siteC"].tunnel_id
    assert tid
    before = tunnel_packets(lab, tid)
    sent, got = ping(lab, lan(lab, "siteC"), lab.cfg.core_addr, 20, 0.02)
    assert got == sent
    time.sleep(1.5)  # workers flush counters about every second
    after = tunnel_packets(lab, tid)
    d_in = sum(after[w]["in"] - before.get(w, {}).get("in", 0) for w in after)
    d_out = sum(after[w]["out"] - before.get(w, {}).get("out", 0) for w in after)
    assert d_in >= sent and d_out >= got, (before, after)
    # `lab status` names the tunnel in its "which worker carries what" lines
    st = status(lab.cfg)
    carried = {w: c for w, c in st["carried"].items() if f"{tid} in" in c}
    assert carried and sum(c[f"{tid} in"] for c in carried.values()) >= sent, st["carried"]
    capsys.readouterr()
    print_status(lab.cfg, st)
    lines = capsys.readouterr().out.splitlines()
    name = next(t["name"] for t in st["tunnels"] if t["id"] == tid)
    assert any(f"/{name} in=" in line for line in lines), lines


def test_one_tunnel_is_carried_by_several_workers(lab: Lab) -> None:
    """Any worker handles any tunnel: many flows of one tunnel spread over the
    nodes (edge ECMP by inner flow for GRE, core ECMP for the way back)."""
    need_site(lab, "siteC")
    tid = lab.sites["siteC"].tunnel_id
    before = tunnel_packets(lab, tid)
    udp_flows(lab, lan(lab, "siteC"), flows=24, per=4)
    time.sleep(1.5)
    after = tunnel_packets(lab, tid)
    carried_in = [w for w in after if after[w]["in"] > before.get(w, {}).get("in", 0)]
    carried_out = [w for w in after if after[w]["out"] > before.get(w, {}).get("out", 0)]
    assert len(carried_in) >= 2, (before, after)
    nodes = {w.split("-")[1] for w in carried_in + carried_out}
    assert nodes == {"node1", "node2"}, (carried_in, carried_out)


# -- failover --------------------------------------------------------------------


def busiest_worker(lab: Lab, tunnel_id: str, src_ns: str) -> str:
    before = tunnel_packets(lab, tunnel_id)
    ping(lab, src_ns, lab.cfg.core_addr, 30, 0.02)
    time.sleep(1.3)
    after = tunnel_packets(lab, tunnel_id)
    victim = max(after, key=lambda w: after[w]["in"] - before.get(w, {}).get("in", 0))
    assert after[victim]["in"] - before.get(victim, {}).get("in", 0) > 0, (before, after)
    return victim


def charon_inits(lab: Lab, site: str) -> int:
    return len(lab.sites[site].charon.log_lines(r"IKE_SA_INIT request"))


def test_worker_failover_under_ping(lab: Lab) -> None:
    """SIGKILL the worker carrying a tunnel under a 10 ms ping and an iperf3
    TCP flow: another worker decrypts the tunnel from then on, the outage is
    measured, no IKE renegotiation, and the restarted worker takes traffic
    again after its snapshot."""
    ipsec = "ike" not in lab.missing and "control" not in lab.missing
    site = "siteA" if ipsec and lab.sites["siteA"].status == "IKE SA established" else "siteC"
    need_site(lab, site)
    tid = lab.sites[site].tunnel_id
    src = lan(lab, site)
    victim = busiest_worker(lab, tid, src)
    inits = charon_inits(lab, site) if site != "siteC" else 0
    ike_before = lab.sites[site].charon.established() if site != "siteC" else None

    count, interval = 300, 0.01
    pinger, tcp = background_traffic(
        src, lab.cfg.core_addr, pings=count, interval=interval, secs=3, ping_flags=("-D",)
    )
    time.sleep(0.8)
    lab.procs[victim].kill()
    lab.procs[victim].wait(5)
    killed = tunnel_packets(lab, tid)
    out, _ = pinger.communicate(timeout=30)
    data = json.loads(tcp.communicate(timeout=30)[0])
    assert "error" not in data, data.get("error")
    assert data["end"]["sum_received"]["bytes"] > 1_000_000
    time.sleep(1.2)
    later = tunnel_packets(lab, tid)
    takers = [w for w in later if later[w]["in"] > killed.get(w, {}).get("in", 0)]
    assert takers and victim not in takers, (killed, later)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    lost = int(m.group(1)) - int(m.group(2))
    # the outage: the longest run of consecutive echo requests without reply
    seqs = sorted({int(x) for x in re.findall(r"icmp_seq=(\d+)", out)})
    gaps = [b - a - 1 for a, b in zip([0, *seqs], [*seqs, int(m.group(1)) + 1], strict=True)]
    outage_ms = max(gaps, default=0) * interval * 1000
    print(
        f"failover ({site}, killed {victim}): {lost} of {m.group(1)} lost, "
        f"outage ~{outage_ms:.0f} ms"
    )
    assert outage_ms < 1000, out[-500:]
    if site != "siteC":
        assert charon_inits(lab, site) == inits, "strongSwan renegotiated"
        after = lab.sites[site].charon.established()
        assert after[0]["initiator-spi"] == ike_before[0]["initiator-spi"]

    # the killed worker comes back, gets its snapshot and carries traffic again
    _, k, i, url = next(w for w in worker_ids(lab) if w[0] == victim)
    lab.start_worker(k, i)
    assert wait_for(lambda: http_get(lab.cfg.ns("control"), url, 1.0)[0] == 200, 15)
    time.sleep(1.0)
    # Many flows from the core toward the GRE site: the core spreads them over
    # the nodes, each node's TUN over its queues, so every worker gets some.
    # (One strongSwan site is one outer UDP flow: after the restart the kernel
    # may keep it on the worker that took over, which is fine.)
    gre = lab.sites["siteC"]
    before = all_tunnel_packets(lab)
    for _ in range(3):
        core_flows(lab, gre.site.lan_host, flows=32, per=3)
    time.sleep(1.5)
    after = all_tunnel_packets(lab)
    assert after.get(victim, 0) > before.get(victim, 0), (victim, before, after)


def all_tunnel_packets(lab: Lab) -> dict[str, float]:
    """Per live worker: inner packets of every tunnel, both directions."""
    out = {}
    for name, _k, _i, url in worker_ids(lab):
        if lab.procs[name].poll() is None:
            out[name] = sum(
                v
                for k, v in scrape(lab, url).items()
                if k.startswith("anywan_worker_tunnel_packets_total{")
            )
    return out


def core_flows(lab: Lab, dst: str, flows: int, per: int) -> None:
    core = lab.cfg.core_ns("acme")
    ns_exec(core, [sys.executable, "-c", UDP_FLOWS, dst, str(flows), str(per)], 60)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_control_restart_under_traffic(lab: Lab) -> None:
    need(lab, "control", "worker")
    sites = ["siteC"] + (
        ["siteA"] if "ike" not in lab.missing and lab.sites["siteA"].charon else []
    )
    for s in sites:
        need_site(lab, s)
    ike_before = {s: lab.sites[s].charon.established() for s in sites if s != "siteC"}
    pingers = {
        s: subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lan(lab, s),
                "ping",
                "-c",
                "300",
                "-i",
                "0.01",
                "-W",
                "1",
                lab.cfg.core_addr,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for s in sites
    }
    time.sleep(0.5)
    took = lab.restart_control()
    assert took < 15
    for s, p in pingers.items():
        out, _ = p.communicate(timeout=30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m and int(m.group(1)) - int(m.group(2)) <= 2, (s, out[-300:])
    for s, before in ike_before.items():
        after = lab.sites[s].charon.established()
        assert after[0]["initiator-spi"] == before[0]["initiator-spi"], "renegotiated"


def test_control_crash_keeps_the_ike_sa_in_step(lab: Lab) -> None:
    """Control SIGKILLed (no final save) while strongSwan and control each
    send a DPD every second: every DPD moves a Message ID, no IKE event
    marks it, and the restored IKE SA must go on with the right ones. With
    the once-a-second save of before, a kill soon after strongSwan's DPD
    restored an old Message ID and control refused strongSwan's next request
    (``message_id``) — the tunnel would go down at strongSwan's DPD timeout."""
    need(lab, "control", "worker")
    need_site(lab, "siteA")
    st = lab.sites["siteA"]
    charon = st.charon
    src = lan(lab, "siteA")
    url = f"http://{lab.cfg.control_addr}:{lab.cfg.metrics_port}/metrics"

    def out_of_step() -> dict[str, float]:
        m = scrape(lab, url)
        return {
            r: m.get(f'anywan_control_ike_dropped_messages_total{{reason="{r}"}}', 0.0)
            for r in ("unexpected_response", "message_id")
        }

    try:
        lab.restart_control(dpd_interval=1.0)
        charon.load([dataclasses.replace(site_connection(lab.cfg, st), dpd_delay="1s")])
        charon.terminate(ike="anywan")
        charon.initiate(child="net", timeout=15)
        before = charon.established()
        assert len(before) == 1, before
        for _ in range(4):
            time.sleep(2.3)  # a few DPDs each way, then a crash at some phase
            assert not any(out_of_step().values()), out_of_step()
            lab.restart_control(dpd_interval=1.0, kill=True)
        time.sleep(3.0)  # DPDs both ways on the restored IKE SA
        charon.rekey(child="net")
        time.sleep(1.0)
        assert not any(out_of_step().values()), out_of_step()
        after = charon.established()
        assert len(after) == 1, after
        key = ("initiator-spi", "responder-spi")
        assert [after[0][k] for k in key] == [before[0][k] for k in key], "renegotiated"
        sent, got = ping(lab, src, lab.cfg.core_addr, 10, 0.05)
        assert got == sent
    finally:
        lab.restart_control()
        charon.load([site_connection(lab.cfg, st)])
        with contextlib.suppress(Exception):
            charon.terminate(ike="anywan")
        charon.initiate(child="net", timeout=15)


# -- bad traffic -----------------------------------------------------------------

ATTACKER = r"""
import json, os, random, sys
from scapy.all import IP, UDP, GRE, ESP, Raw, send, conf
conf.verb = 0
anycast, site_c, n, me = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rnd = random.Random(7)
def spi():
    return rnd.randrange(0x10000, 0xFFFFFFFF)
def junk(k):
    return Raw(os.urandom(k))
def port():
    return rnd.randrange(1024, 65535)
to = IP(src=me, dst=anycast)  # scapy cannot read the edge's multipath route
spoofed = IP(src=site_c, dst=anycast)
inner = IP(src="10.9.9.9", dst="10.200.0.10") / Raw(b"x" * 20)
pk = []
for _ in range(n):
    pk.append(to / ESP(spi=spi(), seq=1) / junk(64))  # nobody's SPI
    pk.append(to / UDP(sport=4500, dport=4500) / ESP(spi=spi(), seq=1) / junk(64))
    pk.append(to / GRE() / inner)  # GRE from no tunnel's address
    pk.append(spoofed / GRE(version=1, proto=0x0800) / Raw(b"x" * 20))  # GRE version 1
    pk.append(IP(src=site_c, dst=anycast, proto=47) / Raw(b"\x00\x00"))  # truncated GRE
    pk.append(to / UDP(sport=port(), dport=500) / junk(40))  # IKE flood on 500
    pk.append(to / UDP(sport=port(), dport=4500) / Raw(b"\x00" * 4) / junk(40))  # and 4500
rnd.shuffle(pk)
send(pk, inter=0.001)
print(json.dumps({"sent": len(pk)}))
"""


def relayed_to_control(lab: Lab) -> float:
    key = 'anywan_worker_ike_relayed_packets_total{direction="to_control"}'
    return sum(
        scrape(lab, url).get(key, 0.0)
        for name, _k, _i, url in worker_ids(lab)
        if lab.procs[name].poll() is None
    )


def test_bad_traffic_is_dropped_and_counted(lab: Lab) -> None:
    need_site(lab, "siteC")
    cfg = lab.cfg
    before = drops(lab)
    relayed = relayed_to_control(lab)
    legit = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lan(lab, "siteC"),
            "ping",
            "-c",
            "200",
            "-i",
            "0.02",
            "-W",
            "1",
            cfg.core_addr,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    n = 40
    site_c = lab.sites["siteC"].site.public_addr
    me = cfg.node_uplink(1)[0].split("/")[0]  # the edge's own address
    argv = [sys.executable, "-c", ATTACKER, cfg.anycast, site_c, str(n), me]
    res = ns_exec(cfg.ns("edge"), argv, 120)
    assert res.returncode == 0, res.stderr[-1000:]
    out, _ = legit.communicate(timeout=30)
    time.sleep(1.5)
    after = drops(lab)
    delta = {r: after.get(r, 0) - before.get(r, 0) for r in after}
    # every bad packet dropped and counted by reason
    assert delta.get("unknown_spi", 0) >= 2 * n, delta
    assert delta.get("malformed", 0) >= n, delta  # truncated GRE
    assert delta.get("no_tunnel", 0) >= n, delta
    assert delta.get("bad_version", 0) >= n, delta
    # the IKE flood reached control (which judges IKE), counted on the way
    assert relayed_to_control(lab) - relayed >= 2 * n
    # the legitimate flow kept running, and nobody died
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and int(m.group(1)) - int(m.group(2)) <= 4, out[-300:]
    dead = [
        n_ for n_, p in lab.procs.items() if p.poll() is not None and not n_.startswith("worker")
    ]
    assert not dead, dead
    assert all(p.poll() is None for n_, p in lab.procs.items() if n_.startswith("worker"))
    code, _ = http_get(cfg.ns("control"), f"{cfg.api_url}/healthz")
    assert code == 200


SHORT_ESP = r"""
import sys
from scapy.all import IP, Raw, send, conf
conf.verb = 0
send([IP(src=sys.argv[2], dst=sys.argv[1], proto=50) / Raw(b"\x01\x02\x03")] * int(sys.argv[3]))
"""


def test_esp_too_short_for_an_spi_is_counted(lab: Lab) -> None:
    need(lab, "control", "worker")
    cfg = lab.cfg
    before = drops(lab)
    me = cfg.node_uplink(1)[0].split("/")[0]
    ns_exec(cfg.ns("edge"), [sys.executable, "-c", SHORT_ESP, cfg.anycast, me, "10"], 60)
    time.sleep(1.5)
    after = drops(lab)
    assert after.get("malformed", 0) - before.get("malformed", 0) >= 10


REPLAYER = r"""
import json, sys
from scapy.all import IP, UDP, L3RawSocket, conf, get_if_list, send, sniff
conf.verb = 0
conf.L3socket = L3RawSocket  # the kernel's routing: scapy cannot read multipath routes
site, n = sys.argv[1], int(sys.argv[2])


def is_esp(p):  # ESP in UDP 4500 from the site: no non-ESP marker
    return (
        IP in p and UDP in p and p[IP].src == site and p[UDP].dport == 4500
        and len(bytes(p[UDP].payload)) > 16 and bytes(p[UDP].payload)[:4] != bytes(4)
    )


ifaces = [i for i in get_if_list() if i != "lo"]
got = sniff(iface=ifaces, lfilter=is_esp, count=1, timeout=10)
if not got:
    print(json.dumps({"captured": 0}))
    sys.exit(0)
pkt = IP(bytes(got[0][IP]))
# captured before veth checksum offload filled it in: let scapy compute it
del pkt[UDP].chksum
pkt = IP(bytes(pkt))
send([pkt] * n, inter=0.005)
esp = bytes(pkt[UDP].payload)
print(json.dumps({"captured": 1, "spi": esp[:4].hex(), "seq": int.from_bytes(esp[4:8], "big")}))
"""


def test_replayed_esp_is_dropped_as_replay(lab: Lab) -> None:
    """The attacker in the edge captures one real ESP packet of site A (replay
    protection on: strongSwan's default window) and sends it again 30 times:
    each copy is counted as a ``replay`` drop and the site's flow continues."""
    need_site(lab, "siteA")
    cfg = lab.cfg
    site_a = lab.sites["siteA"].site.public_addr
    n = 30
    before = drops(lab)
    legit = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lan(lab, "siteA"),
            "ping",
            "-q",
            "-c",
            "250",
            "-i",
            "0.02",
            "-W",
            "1",
            cfg.core_addr,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    res = ns_exec(cfg.ns("edge"), [sys.executable, "-c", REPLAYER, site_a, str(n)], 60)
    out, _ = legit.communicate(timeout=30)
    assert res.returncode == 0, res.stderr[-1000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["captured"] == 1, info
    time.sleep(1.5)
    after = drops(lab)
    delta = {r: after.get(r, 0) - before.get(r, 0) for r in after}
    tid = lab.sites["siteA"].tunnel_id
    sas = lab.api.call("GET", f"/accounts/acme/magic/ipsec_tunnels/{tid}/sas")
    brief = [(c["spi"], c["direction"], c["replay_window"], c["packets"]) for c in sas["child_sas"]]
    assert delta.get("replay", 0) >= n, (info, {k: v for k, v in delta.items() if v}, brief)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and int(m.group(1)) - int(m.group(2)) <= 2, out
    assert all(p.poll() is None for p in lab.procs.values()), [
        k for k, p in lab.procs.items() if p.poll() is not None
    ]


# -- observability ------------------------------------------------------------------


def prom_query(lab: Lab, q: str) -> list[dict]:
    import urllib.parse

    code, body = http_get(
        lab.cfg.ns("control"), f"{lab.prometheus_url}/api/v1/query?query={urllib.parse.quote(q)}"
    )
    assert code == 200, body
    return json.loads(body)["data"]["result"]


def test_prometheus_scrapes_every_target_and_sees_traffic(lab: Lab) -> None:
    need(lab, "control", "worker", "prometheus")
    expected = 1 + lab.cfg.nodes * lab.cfg.worker_count

    def all_up() -> bool:
        res = prom_query(lab, "up")
        return len(res) == expected and all(r["value"][1] == "1" for r in res)

    assert wait_for(all_up, 30), prom_query(lab, "up")
    q = "sum(anywan_worker_tunnel_packets_total)"
    first = wait_for(lambda: bool(prom_query(lab, q)), 20)
    assert first
    v1 = float(prom_query(lab, q)[0]["value"][1])
    ping(lab, lan(lab, "siteC"), lab.cfg.core_addr, 40, 0.02)
    assert wait_for(lambda: float(prom_query(lab, q)[0]["value"][1]) > v1, 20)


def metrics_endpoints(lab: Lab) -> list[str]:
    cfg = lab.cfg
    return [f"http://{cfg.control_addr}:{cfg.metrics_port}/metrics"] + [
        w[3] for w in worker_ids(lab) if lab.procs[w[0]].poll() is None
    ]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (prometheus package)")
def test_promtool_check_metrics_on_every_endpoint(lab: Lab) -> None:
    need(lab, "control", "worker")
    for url in metrics_endpoints(lab):
        code, body = http_get(lab.cfg.ns("control"), url)
        assert code == 200
        res = subprocess.run(
            ["promtool", "check", "metrics"],
            input=body + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, (url, res.stdout[-1500:], res.stderr[-1500:])


def test_dashboard_metrics_exist_in_the_scraped_output(lab: Lab) -> None:
    from tests.deploy.test_observability import SYNTHETIC, dashboard_queries, promql_metric_names

    need(lab, "control", "worker")
    scraped: set[str] = set()
    for url in metrics_endpoints(lab):
        _, body = http_get(lab.cfg.ns("control"), url)
        for line in body.splitlines():
            m = re.match(r"# TYPE (\S+) (\w+)", line)
            if m:
                name, kind = m.groups()
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
                scraped.update(name + s for s in suffixes.get(kind, ("",)))
                scraped.add(name)
            elif line and not line.startswith("#"):
                scraped.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    missing = {
        (title, n)
        for _file, title, expr in dashboard_queries()
        for n in promql_metric_names(expr)
        if n not in scraped | SYNTHETIC
    }
    assert not missing, missing


# -- tenancy ------------------------------------------------------------------------


def test_two_accounts_with_the_same_prefixes_stay_apart(lab: Lab) -> None:
    """acme's siteA and globex's siteD both use 10.10.1.0/24: each reaches its
    own core, and a marked ping from acme never appears in globex's network."""
    need_site(lab, "siteA")
    need_site(lab, "siteD")
    cfg = lab.cfg
    marker = "a1cecafe"
    caps = []
    for k in range(1, cfg.nodes + 1):
        caps.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    cfg.account_ns(k, "globex"),
                    "tcpdump",
                    "-l",
                    "-n",
                    "-i",
                    "any",
                    "-c",
                    "1000",
                    "-x",
                    "icmp",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    time.sleep(1.0)
    try:
        sent, got = ping(lab, lan(lab, "siteA"), cfg.core_addr, 20, 0.02)
        ns_exec(lan(lab, "siteA"), ["ping", "-c", "10", "-i", "0.02", "-p", marker, cfg.core_addr])
        assert got == sent
        sent, got = ping(lab, lan(lab, "siteD"), cfg.core_addr, 5, 0.05)
        assert got == sent
    finally:
        outs = []
        for c in caps:
            c.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                outs.append(c.communicate(timeout=5)[0])
    text = "".join(outs).replace(" ", "").replace("\n", "")
    assert marker not in text.lower()
    # globex's own traffic did show up there (the capture worked)
    assert "10.10.1.10" in "".join(outs)


# -- the docker-compose roles, run against the lab ---------------------------------

EXTRA_SITE = """
[[accounts]]
id = "compose"
core = "core-compose"

[[sites]]
name = "siteE"
account = "compose"
kind = "ipsec"
wan = "198.51.100.16/30"
lan = "10.10.9.0/24"
interface_address = "10.255.0.8/31"
ike_port = 500
"""


def test_compose_provision_and_site_roles(lab: Lab, tmp_path: Path) -> None:
    """docker-compose's `provision` and `site` containers run
    `python -m deploy.lab provision|site`; here the same commands run in lab
    namespaces against the lab's control: the tunnel is created through the
    API, the PSK handed over in a 0600 file, and the strongSwan site comes up."""
    need(lab, "control", "worker", "ike")
    cfg = lab.cfg
    conf = tmp_path / "lab.toml"
    conf.write_text(DEFAULT_CONFIG.read_text() + EXTRA_SITE)
    psk_dir = tmp_path / "psk"
    token = lab.token
    assert token
    env_argv = ["env", f"ANYWAN_API_TOKEN={token}"]
    res = ns_exec(
        cfg.ns("control"),
        [
            *env_argv,
            sys.executable,
            "-m",
            "deploy.lab",
            "provision",
            f"--config={conf}",
            f"--api={cfg.api_url}",
            "--name=siteE",
            f"--psk-dir={psk_dir}",
        ],
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    handed = psk_dir / "siteE.json"
    assert handed.stat().st_mode & 0o777 == 0o600
    tunnel_id = json.loads(handed.read_text())["tunnel_id"]

    site_ns = lab.topo.namespace("siteE")
    lab.topo.veth(
        lab.ns["edge"], "sE", site_ns, "wan", addr_a="198.51.100.17/30", addr_b="198.51.100.18/30"
    )
    site_ns.route("default", via="198.51.100.17")
    lab.spawn(
        site_ns,
        "compose-siteE",
        [
            sys.executable,
            "-m",
            "deploy.lab",
            "site",
            f"--config={conf}",
            "--name=siteE",
            f"--psk-dir={psk_dir}",
            f"--run-dir={tmp_path / 'run'}",
        ],
    )
    assert wait_for(lambda: "1 IKE SA(s) established" in lab.log_tail("compose-siteE", 50), 45), (
        lab.log_tail("compose-siteE", 30)
    )
    sas = lab.api.call("GET", f"/accounts/compose/magic/ipsec_tunnels/{tunnel_id}/sas")
    assert sas["ike_sas"] and sas["child_sas"], sas
    end = lab.procs["compose-siteE"]
    end.terminate()
    end.wait(10)
    # charon's DELETE on the way out removes the SAs in control
    assert wait_for(
        lambda: (
            not lab.api.call("GET", f"/accounts/compose/magic/ipsec_tunnels/{tunnel_id}/sas")[
                "child_sas"
            ]
        ),
        15,
    )


# -- rekeying under traffic ---------------------------------------------------------


def worker_sa_counts(lab: Lab) -> list[float]:
    return [
        scrape(lab, url).get("anywan_worker_sas", -1.0)
        for name, _k, _i, url in worker_ids(lab)
        if lab.procs[name].poll() is None
    ]


def worker_drops(lab: Lab, reason: str) -> float:
    """One drop reason summed over the live workers."""
    key = f'anywan_worker_drops_total{{reason="{reason}"}}'
    return sum(
        scrape(lab, url).get(key, 0.0)
        for name, _k, _i, url in worker_ids(lab)
        if lab.procs[name].poll() is None
    )


def test_rekey_under_traffic_started_by_the_site(lab: Lab) -> None:
    """strongSwan rekeys its Child SA and then its IKE SA while iperf3 and a
    10 ms ping run: a handful of packets at most, new SAs everywhere, old
    ones gone on strongSwan and on every worker."""
    need_site(lab, "siteA")
    charon = lab.sites["siteA"].charon
    before = charon.established()[0]
    child_before = before["child-sas"][0]["spi-in"]
    src = lan(lab, "siteA")
    unknown_before = worker_drops(lab, "unknown_spi")
    pinger, tcp = background_traffic(src, lab.cfg.core_addr, pings=300, secs=3)
    time.sleep(0.5)
    charon.rekey(child="net")
    time.sleep(1.0)
    charon.rekey(ike="anywan")
    out, _ = pinger.communicate(timeout=30)
    data = json.loads(tcp.communicate(timeout=30)[0])
    assert "error" not in data, data.get("error")
    assert data["end"]["sum_received"]["bytes"] > 1_000_000
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m and int(m.group(1)) - int(m.group(2)) <= 5, out
    # Not one of the site's packets met a worker without its SA: a worker that
    # stops applying the bus (the lost wake-up once did that) or an answer that
    # overtakes its SA's publication shows up here as unknown_spi. (This lab's
    # load rarely hits the second race — it passed twice with the answer hold
    # disabled; bench.failover's rekey reps, with iperf3 over two workers, do.)
    # Worker counters are flushed every 0.5 s.
    time.sleep(1.2)
    assert worker_drops(lab, "unknown_spi") == unknown_before

    def rekeyed() -> bool:
        sas = charon.established()
        return (
            len(sas) == 1
            and sas[0]["initiator-spi"] != before["initiator-spi"]
            and len(sas[0]["child-sas"]) == 1
            and sas[0]["child-sas"][0]["spi-in"] != child_before
        )

    assert wait_for(rekeyed, 15), charon.established()
    # old SAs removed everywhere: control lists only the new pair, and every
    # worker holds the same number of SAs again
    new = charon.established()[0]["child-sas"][0]
    want = {int(new["spi-in"], 16), int(new["spi-out"], 16)}
    tid = lab.sites["siteA"].tunnel_id

    def control_has_only_new() -> bool:
        sas = lab.api.call("GET", f"/accounts/acme/magic/ipsec_tunnels/{tid}/sas")
        return {int(c["spi"], 16) for c in sas["child_sas"]} == want

    assert wait_for(control_has_only_new, 15)
    assert wait_for(lambda: len(set(worker_sa_counts(lab))) == 1, 15), worker_sa_counts(lab)
    sent, got = ping(lab, src, lab.cfg.core_addr, 10, 0.05)
    assert got == sent


def test_rekey_under_traffic_started_by_control(lab: Lab) -> None:
    """Control restarted with short lifetimes (Child 6 s, IKE 10 s); site A
    negotiates afresh, then a 10 ms ping and iperf3 run ~14 s while *control*
    rekeys the Child SA and the IKE SA (strongSwan's own rekey times are hours
    away, and it is the responder of the new IKE SA). A handful of pings lost at
    most, the first SAs gone from strongSwan, control and the workers. Last in
    the module: the finally restores the default lifetimes and re-initiates."""
    need_site(lab, "siteA")
    charon = lab.sites["siteA"].charon
    tid = lab.sites["siteA"].tunnel_id
    src = lan(lab, "siteA")
    metrics_url = f"http://{lab.cfg.control_addr}:{lab.cfg.metrics_port}/metrics"

    def control_spis() -> set[int]:
        sas = lab.api.call("GET", f"/accounts/acme/magic/ipsec_tunnels/{tid}/sas")
        return {int(c["spi"], 16) for c in sas["child_sas"]}

    def charon_spis() -> set[int]:
        return {
            int(c[k], 16)
            for sa in charon.established()
            for c in sa["child-sas"]
            for k in ("spi-in", "spi-out")
        }

    try:
        lab.restart_control(lifetimes={"child": 6.0, "ike": 10.0})
        charon.terminate(ike="anywan")
        charon.initiate(child="net", timeout=15)
        first = charon.established()
        assert len(first) == 1 and first[0].get("initiator") == "yes", first
        old_ike = first[0]["initiator-spi"], first[0]["responder-spi"]
        old_child = charon_spis()
        assert wait_for(lambda: control_spis() == old_child, 10), (control_spis(), old_child)
        ns_exec(src, ["ping", "-c", "3", "-i", "0.2", "-W", "1", lab.cfg.core_addr])
        rekeys_before = scrape(lab, metrics_url)
        pinger, tcp = background_traffic(src, lab.cfg.core_addr, pings=1400, secs=12)
        out, _ = pinger.communicate(timeout=60)
        data = json.loads(tcp.communicate(timeout=60)[0])
        assert "error" not in data, data.get("error")
        assert data["end"]["sum_received"]["bytes"] > 1_000_000
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m and int(m.group(1)) - int(m.group(2)) <= 8, out
        rekeys_after = scrape(lab, metrics_url)
        for kind in ("child", "ike"):
            key = f'anywan_control_child_sa_rekeys_total{{result="{kind}"}}'
            assert rekeys_after.get(key, 0) > rekeys_before.get(key, 0), (kind, rekeys_after)
        # strongSwan: a new IKE SA that control initiated, new Child SPIs
        now = charon.established()
        assert len(now) == 1, now
        assert (now[0]["initiator-spi"], now[0]["responder-spi"]) != old_ike
        assert now[0].get("initiator") != "yes", now[0]  # control started the IKE rekey
        assert not charon_spis() & old_child
        # old SAs gone from control and from every worker; control and strongSwan
        # agree (rekeys keep coming every ~6 s, so retry until they line up)
        assert wait_for(lambda: not control_spis() & old_child, 15), control_spis()
        assert wait_for(lambda: control_spis() == charon_spis(), 15)
        assert wait_for(lambda: len(set(worker_sa_counts(lab))) == 1, 15), worker_sa_counts(lab)
        sent, got = ping(lab, src, lab.cfg.core_addr, 10, 0.05)
        assert got == sent
    finally:
        lab.restart_control()
        with contextlib.suppress(Exception):
            charon.terminate(ike="anywan")
        charon.initiate(child="net", timeout=15)
