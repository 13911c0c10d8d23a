"""The anywan netns lab: the whole system on one host, with real customer routers.

``python -m deploy.lab up|down|status`` (``deploy/lab.sh`` runs it after
``deploy/setup.sh``). The topology comes from ``deploy/lab.toml``; the
anywan settings from ``deploy/config/anywan.toml`` (the same files
docker-compose mounts). Built with :mod:`deploy.netns` (pyroute2) and
:mod:`deploy.strongswan`.

What ``up`` builds (prefix ``aw-``)::

    siteA-lan ─ siteA  (strongSwan kernel-libipsec, IKE from port 500) ─┐
    siteB-lan ─ siteB  (strongSwan, IKE from 4500) ─ siteB-nat (nft) ──┤
    siteC-lan ─ siteC  (deploy/gre_site.py, userspace GRE) ─────────────┼─ edge ═ECMP═ node1..N
    siteD-lan ─ siteD  (strongSwan, 2nd account, same prefixes) ───────┘   203.0.113.1 on each node
    node<k>  ── mgmt bridge ── control (anywan-control, Prometheus)   [── host, optional]
    node<k>-<account> (the account's TUN, made by the workers) ── core[-<account>]
                                                         (iperf3 server, web service)

* **edge**: the anycast address is an ECMP multipath route to every node;
  ``fib_multipath_hash_policy`` 3 with fields 0x0cf7 hashes ESP by SPI (the
  kernel's flow dissector reads ESP's SPI as the port pair:
  ``proto_ports_offset`` in include/net/ip.h), UDP by ports and GRE by its
  inner flow. Policy 1 would hash ESP by SPI too but keep each GRE tunnel on
  one node; 0 and 2 put all ESP of a site on one node.
  ``tests/deploy/test_lab_ecmp.py`` measures this on the running kernel.
  strongSwan's kernel-libipsec only speaks ESP in UDP (RFC 3948), so the
  strongSwan sites' ESP reaches one node per site (by UDP ports); each
  tunnel's return traffic spreads over the nodes by inner flow at the core.
* **nodes**: one ``anywan-worker`` per CPU core (``workers_per_node = 0``),
  all sharing the node's SO_REUSEPORT sockets and each account's multi-queue
  TUN (in namespace ``node<k>-<account>``, linked to the account's core).
* **control**: ``anywan-control serve``; workers reach its bus and IKE relay
  over the management bridge; Debian's ``prometheus`` scrapes control and
  every worker.
* Tunnels, PSKs and routes are created through control's REST API, as a
  customer would, and the strongSwan sites are configured with what the API
  returned (identities, PSK).

``down`` removes every namespace (and every process inside), the host link
and the run directory — from the state file, and by sweeping the prefix, so
it also cleans up after an ``up`` that crashed half-way.

A component that is not built yet (control service, worker) is reported as
missing with the module that would provide it; nothing is faked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy import scrape

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_CONFIG = HERE / "lab.toml"
ANYWAN_CONFIG = HERE / "config" / "anywan.toml"
PROMETHEUS_CONFIG = HERE / "prometheus" / "prometheus.yml"
CORE_PORTS = (5201, 5202, 5203)
"""iperf3 servers in every core (one test at a time each)."""
HTTP_PORT = 80


class LabError(RuntimeError):
    """The lab could not be built; the message says what to fix."""


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


def _net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)


def _host(cidr: str, n: int) -> str:
    """Address number ``n`` of a network (1 = first host)."""
    return str(_net(cidr).network_address + n)


def _with_len(cidr: str, n: int) -> str:
    net = _net(cidr)
    return f"{net.network_address + n}/{net.prefixlen}"


@dataclass(frozen=True)
class Site:
    name: str
    account: str
    kind: str
    """``ipsec`` (strongSwan) or ``gre`` (deploy/gre_site.py)."""
    wan: str
    lan: str
    interface_address: str
    ike_port: int = 500
    nat: str | None = None
    lan6: str | None = None
    """An IPv6 LAN prefix (GRE sites: IPv6 inner traffic through the tunnel)."""

    @property
    def lan6_host(self) -> str | None:
        return _host(self.lan6, 10) if self.lan6 else None

    @property
    def public_addr(self) -> str:
        """The address anywan sees: the site's WAN, or the NAT's public side."""
        return _host(self.wan, 2)

    @property
    def router_addr(self) -> str:
        """The router's own outer address (behind the NAT for site B)."""
        return _host(self.nat, 2) if self.nat else self.public_addr

    @property
    def lan_host(self) -> str:
        return _host(self.lan, 10)

    @property
    def lan_router(self) -> str:
        return _host(self.lan, 1)

    @property
    def our_side(self) -> str:
        """anywan's end of the tunnel's /31 (the API's interface_address)."""
        return self.interface_address

    @property
    def customer_side(self) -> str:
        iface = ipaddress.IPv4Interface(self.interface_address)
        peer = ipaddress.IPv4Address(int(iface.ip) ^ 1)
        return f"{peer}/{iface.network.prefixlen}"


@dataclass(frozen=True)
class Account:
    id: str
    core: str


@dataclass
class LabConfig:
    prefix: str
    anycast: str
    run_dir: Path
    hash_policy: int = 3
    hash_fields: str = "0x0cf7"
    nodes: int = 2
    workers_per_node: int = 0
    uplink: str = "172.16.{node}.0/30"
    mgmt: str = "10.99.0.0/24"
    api_port: int = 8080
    metrics_port: int = 9100
    worker_metrics_port: int = 9101
    prometheus_port: int = 9090
    id_suffix: str = "ipsec.anywan.example"
    host_link: bool = True
    host_address: str = "10.98.0.1/30"
    inner_link: str = "10.201.{node}.0/30"
    core_host: str = "10.200.0.10/24"
    accounts: list[Account] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    child_lifetime: float | None = None
    """Override control's Child SA lifetime (tests of rekeying)."""
    ike_lifetime: float | None = None
    """Override control's IKE SA lifetime (tests of rekeying)."""

    @classmethod
    def load(
        cls,
        path: Path = DEFAULT_CONFIG,
        *,
        prefix: str | None = None,
        run_dir: Path | None = None,
        host_link: bool | None = None,
        workers_per_node: int | None = None,
        sites: list[str] | None = None,
    ) -> LabConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LabError(f"{path}: {exc}") from None
        pfx = prefix or data.get("prefix", "aw-")
        if len(pfx) < 3 or not pfx.endswith("-"):
            raise LabError(f"prefix {pfx!r}: use at least 3 characters ending in '-'")
        edge = data.get("edge", {})
        nodes = data.get("nodes", {})
        control = data.get("control", {})
        host = data.get("host", {})
        inner = data.get("inner", {})
        cfg = cls(
            prefix=pfx,
            anycast=data.get("anycast", "203.0.113.1"),
            run_dir=run_dir or Path(f"/var/tmp/anywan-{pfx.rstrip('-')}"),
            hash_policy=int(edge.get("hash_policy", 3)),
            hash_fields=str(edge.get("hash_fields", "0x0cf7")),
            nodes=int(nodes.get("count", 2)),
            workers_per_node=int(
                nodes.get("workers_per_node", 0) if workers_per_node is None else workers_per_node
            ),
            uplink=nodes.get("uplink", "172.16.{node}.0/30"),
            mgmt=control.get("mgmt", "10.99.0.0/24"),
            api_port=int(control.get("api_port", 8080)),
            metrics_port=int(control.get("metrics_port", 9100)),
            worker_metrics_port=int(control.get("worker_metrics_port", 9101)),
            prometheus_port=int(control.get("prometheus_port", 9090)),
            id_suffix=control.get("id_suffix", "ipsec.anywan.example"),
            host_link=bool(host.get("link", True)) if host_link is None else host_link,
            host_address=host.get("address", "10.98.0.1/30"),
            inner_link=inner.get("link", "10.201.{node}.0/30"),
            core_host=inner.get("core_host", "10.200.0.10/24"),
            accounts=[Account(a["id"], a.get("core", f"core-{a['id']}")) for a in data["accounts"]],
            sites=[
                Site(
                    name=s["name"],
                    account=s["account"],
                    kind=s["kind"],
                    wan=s["wan"],
                    lan=s["lan"],
                    interface_address=s["interface_address"],
                    lan6=s.get("lan6"),
                    ike_port=int(s.get("ike_port", 500)),
                    nat=s.get("nat"),
                )
                for s in data["sites"]
                if sites is None or s["name"] in sites
            ],
        )
        known = {a.id for a in cfg.accounts}
        for s in cfg.sites:
            if s.account not in known:
                raise LabError(f"site {s.name}: unknown account {s.account!r}")
            if s.kind not in ("ipsec", "gre"):
                raise LabError(f"site {s.name}: kind must be ipsec or gre")
        used = {s.account for s in cfg.sites}
        cfg.accounts = [a for a in cfg.accounts if a.id in used]
        if cfg.nodes < 1:
            raise LabError("nodes.count must be >= 1")
        return cfg

    # -- derived names and addresses --------------------------------------------
    def ns(self, name: str) -> str:
        return self.prefix + name

    @property
    def worker_count(self) -> int:
        return self.workers_per_node or max(1, os.cpu_count() or 1)

    @property
    def control_addr(self) -> str:
        return _host(self.mgmt, 1)

    def node_mgmt(self, k: int) -> str:
        return _host(self.mgmt, 10 + k)

    def node_uplink(self, k: int) -> tuple[str, str]:
        """(edge side, node side) with prefix length."""
        net = self.uplink.format(node=k)
        return _with_len(net, 1), _with_len(net, 2)

    def inner(self, k: int) -> tuple[str, str]:
        """(core side, node-account side) of node k's link to an account's core."""
        net = self.inner_link.format(node=k)
        return _with_len(net, 1), _with_len(net, 2)

    def account_ns(self, k: int, account: str) -> str:
        return self.ns(f"node{k}-{account}")

    def core_ns(self, account: str) -> str:
        return self.ns(next(a.core for a in self.accounts if a.id == account))

    def home_node(self, site: Site) -> int | None:
        """The node that carries a strongSwan site's return traffic (sites
        spread round-robin over the nodes); None for GRE (ECMP, any node)."""
        if site.kind != "ipsec":
            return None
        ipsec = [s for s in self.sites if s.kind == "ipsec"]
        return ipsec.index(site) % self.nodes + 1

    def sites_of(self, account: str) -> list[Site]:
        return [s for s in self.sites if s.account == account]

    @property
    def core_addr(self) -> str:
        return str(ipaddress.IPv4Interface(self.core_host).ip)

    core_addr6 = "fd00:200::10"
    """The core's IPv6 service address (for sites with a ``lan6``)."""

    def inner6(self, node: int) -> tuple[str, str]:
        """IPv6 of the core <-> node<k>-<account> link: (core side, node side)."""
        return f"fd00:201:{node}::1/64", f"fd00:201:{node}::2/64"

    @property
    def api_url(self) -> str:
        return f"http://{self.control_addr}:{self.api_port}"

    @property
    def host_peer(self) -> str:
        return str(ipaddress.IPv4Interface(self.host_address).ip + 1)

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"


# --------------------------------------------------------------------------
# components: what exists in this checkout
# --------------------------------------------------------------------------


def missing_components() -> dict[str, str]:
    """Components of anywan this checkout cannot run yet → why (module named)."""
    out: dict[str, str] = {}
    try:
        from control import cli as control_cli

        if "serve" not in control_cli.build_parser().format_help():
            out["control"] = "control/cli.py has no `serve` command yet"
        importlib.import_module("control.service")
    except ImportError as exc:
        out["control"] = f"control service not importable ({exc.name}: control/service.py)"
    try:
        from dataplane import cli as worker_cli

        if not hasattr(worker_cli, "make_config"):
            out["worker"] = "dataplane/cli.py is a stub (worker not built yet)"
        importlib.import_module("dataplane.worker")
    except ImportError as exc:
        out["worker"] = f"worker not importable ({exc.name}: dataplane/worker.py)"
    return out


def missing_tools() -> dict[str, str]:
    need = {
        "ip": "iproute2",
        "nft": "nftables",
        "iperf3": "iperf3",
        "swanctl": "strongswan-swanctl",
        "prometheus": "prometheus",
        "ping": "iputils-ping",
    }
    out = {
        tool: f"needs {pkg} (deploy/setup.sh)"
        for tool, pkg in need.items()
        if not shutil.which(tool)
    }
    if not Path("/usr/lib/ipsec/charon").exists():
        out["charon"] = "needs strongswan-charon (deploy/setup.sh)"
    return out


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to spot reused PIDs."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_pid(pid: int, grace: float = 2.0) -> None:
    """SIGTERM, wait up to ``grace``, SIGKILL. By PID only."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def entry_point(script: str, module: str) -> list[str]:
    """argv for a console script of this venv (``anywan-control``), or the
    same ``main()`` through the interpreter when the script is not installed."""
    path = Path(sys.executable).parent / script
    if path.exists():
        return [str(path)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def wait_until(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _addr6(ns: Any, ifname: str, cidr: str) -> None:
    """An IPv6 address usable at once (no duplicate address detection wait)."""
    ns.sysctl(f"net.ipv6.conf.{ifname}.disable_ipv6", 0)
    ns.sysctl(f"net.ipv6.conf.{ifname}.accept_dad", 0)
    ns.addr(ifname, cidr)


def ns_exec(
    ns: str, argv: list[str], timeout: float = 15.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and res.returncode != 0:
        raise LabError(
            f"{ns}: {' '.join(argv[:3])}... exited {res.returncode}: {res.stderr.strip()}"
        )
    return res


def http_get(ns: str, url: str, timeout: float = 3.0, token: str | None = None) -> tuple[int, str]:
    """GET ``url`` from inside namespace ``ns`` (curl): (status, body)."""
    argv = ["curl", "-s", "-m", str(timeout), "-w", "\n%{http_code}"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    res = ns_exec(ns, [*argv, url], timeout=timeout + 5)
    body, _, code = res.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


# --------------------------------------------------------------------------
# REST client (through the management network, from the control namespace)
# --------------------------------------------------------------------------


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status


class Api:
    """Control's REST API, called from inside its namespace with curl (the
    lab process itself stays in the root namespace)."""

    def __init__(self, ns: str | None, base: str, token: str) -> None:
        self.ns = ns
        self.base = base
        self._token = token

    def __repr__(self) -> str:
        return f"Api({self.base} in {self.ns}, token=<hidden>)"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
        """JSON in and out; the ``result`` of a Cloudflare-style envelope."""
        text = self._curl(method, path, body, timeout)
        data = json.loads(text) if text else None
        if isinstance(data, dict) and "result" in data:
            return data["result"]
        return data

    def metric(self, name: str, timeout: float = 10.0) -> float:
        """One unlabelled sample of control's ``/metrics`` (0 when absent)."""
        body = self._curl("GET", "/metrics", None, timeout)
        return next((v for labels, v in scrape.samples(body, name) if not labels), 0.0)

    def _curl(self, method: str, path: str, body: Any, timeout: float) -> str:
        argv = ["curl", "-s", "-m", str(timeout), "-X", method, "-w", "\n%{http_code}", "-K", "-"]
        cfg = f'header = "Authorization: Bearer {self._token}"\n'
        if body is not None:
            cfg += 'header = "Content-Type: application/json"\n'
            argv += ["--data-binary", json.dumps(body)]
        prefix = ["ip", "netns", "exec", self.ns] if self.ns else []
        res = subprocess.run(
            [*prefix, *argv, self.base + path],
            input=cfg,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            check=False,
        )
        text, _, code = res.stdout.rpartition("\n")
        status = int(code) if code.isdigit() else 0
        if not 200 <= status < 300:
            raise ApiError(status, text or res.stderr)
        return text


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------


@dataclass
class SiteState:
    site: Site
    tunnel_id: str | None = None
    local_id: str | None = None
    psk: str | None = field(default=None, repr=False)
    charon: Any = None
    gre: Any = None
    status: str = "not started"


class Lab:
    """Build, run and tear down the lab. ``up()`` leaves everything running
    (the CLI exits, processes stay); ``down()`` removes it."""

    def __init__(self, cfg: LabConfig, *, log: Any = None) -> None:
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, flush=True))
        self.topo: Any = None
        self.ns: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.sites: dict[str, SiteState] = {s.name: SiteState(s) for s in cfg.sites}
        self.missing: dict[str, str] = {}
        self.token: str | None = None
        self.api: Api | None = None
        self.hash_policy_used: int | None = None
        self._lock = threading.RLock()

    # -- state file -------------------------------------------------------------
    def _save(self) -> None:
        # sites start in threads: one writer at a time
        with self._lock:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.cfg.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True, default=str))
            tmp.replace(self.cfg.state_path)

    def _record_pid(self, name: str, pid: int) -> None:
        self.state.setdefault("pids", {})[name] = [pid, _proc_start(pid)]
        self._save()

    # -- processes ----------------------------------------------------------------
    def spawn(
        self, ns: Any, name: str, argv: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        """Start a long-running process in ``ns`` with its output in logs/<name>.log."""
        logs = self.cfg.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        finally:
            out.close()
        self.procs[name] = proc
        self._record_pid(name, proc.pid)
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.cfg.run_dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- up -------------------------------------------------------------------------
    def up(self) -> dict[str, Any]:
        from deploy.netns import Topology

        cfg = self.cfg
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        down(cfg, quiet=True, log=self.log)
        cfg.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = {
            "prefix": cfg.prefix,
            "run_dir": str(cfg.run_dir),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pids": {},
            "root_links": [],
        }
        if cfg.host_link:
            self.state["root_links"].append(cfg.prefix + "host")
        self._save()
        self.missing = {**missing_components(), **missing_tools()}
        self.topo = Topology(cfg.prefix)
        t0 = time.monotonic()
        self.build_network()
        self.log(f"lab: network built in {time.monotonic() - t0:.1f}s")
        self.start_core_services()
        if "control" not in self.missing:
            self.start_control()
        if "worker" not in self.missing and "control" not in self.missing:
            self.start_workers()
        self.start_prometheus()
        if "control" not in self.missing:
            self.provision()
        self.start_sites()
        self.state["missing"] = self.missing
        self.state["sites"] = {
            n: {"status": s.status, "tunnel_id": s.tunnel_id, "account": s.site.account}
            for n, s in self.sites.items()
        }
        self._save()
        for ns in self.ns.values():
            ns.close()
        return self.state

    # -- network --------------------------------------------------------------------
    def _namespace(self, name: str) -> Any:
        ns = self.topo.namespace(name)
        self.ns[name] = ns
        return ns

    def build_network(self) -> None:
        cfg = self.cfg
        edge = self._namespace("edge")
        edge.enable_forwarding()
        edge.sysctl("net.ipv4.conf.all.rp_filter", 0)
        self.hash_policy_used = set_multipath_hash(edge, cfg.hash_policy, cfg.hash_fields)
        self.state["hash_policy"] = self.hash_policy_used

        # control + management bridge
        control = self._namespace("control")
        control.enable_forwarding()
        ipr = control.ipr
        ipr.link("add", ifname="mgmt", kind="bridge")
        control.addr("mgmt", _with_len(cfg.mgmt, 1))
        control.up("mgmt")
        bridge = control.index("mgmt")

        hops = []
        for k in range(1, cfg.nodes + 1):
            node = self._namespace(f"node{k}")
            node.sysctl("net.ipv4.conf.all.rp_filter", 0)
            node.sysctl("net.ipv4.conf.default.rp_filter", 0)
            e_side, n_side = cfg.node_uplink(k)
            self.topo.veth(edge, f"n{k}", node, "up", addr_a=e_side, addr_b=n_side)
            node.addr("lo", f"{cfg.anycast}/32")
            node.route("default", via=e_side.split("/")[0])
            hops.append((n_side.split("/")[0], 1))
            # management: a veth into control's bridge
            self.topo.veth(
                control,
                f"m{k}",
                node,
                "mgmt",
                addr_b=f"{cfg.node_mgmt(k)}/{_net(cfg.mgmt).prefixlen}",
            )
            control.ipr.link("set", index=control.index(f"m{k}"), master=bridge)
            if cfg.host_link:
                node.route(_net(cfg.host_address).with_prefixlen, via=cfg.control_addr)
        edge.route(f"{cfg.anycast}/32", multipath=hops)

        if cfg.host_link:
            self.topo.veth(
                self.topo.root,
                cfg.prefix + "host",
                control,
                "host",
                addr_a=cfg.host_address,
                addr_b=f"{cfg.host_peer}/{_net(cfg.host_address).prefixlen}",
            )
            self.topo.root.route(cfg.mgmt, via=cfg.host_peer, replace=True)

        # each account: a core namespace and, on every node, the account's
        # inner namespace (the workers put their TUN there) linked to it
        for acct in cfg.accounts:
            core = self._namespace(next(a.core for a in cfg.accounts if a.id == acct.id))
            core.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
            core.enable_forwarding()  # site-to-site via the core (see below)
            core.sysctl("net.ipv4.conf.all.rp_filter", 0)
            # the service address on lo (no dummy module in every kernel)
            core.addr("lo", f"{cfg.core_addr}/32")
            core.addr("lo", f"{cfg.core_addr6}/128")
            back = []
            back6 = []
            for k in range(1, cfg.nodes + 1):
                inner = self._namespace(f"node{k}-{acct.id}")
                inner.enable_forwarding()
                inner.sysctl("net.ipv4.conf.all.rp_filter", 0)
                inner.sysctl("net.ipv4.conf.default.rp_filter", 0)
                c_side, a_side = cfg.inner(k)
                self.topo.veth(core, f"n{k}", inner, "core", addr_a=c_side, addr_b=a_side)
                inner.route(_net(cfg.core_host).with_prefixlen, via=c_side.split("/")[0])
                back.append((a_side.split("/")[0], 1))
                c6, a6 = cfg.inner6(k)
                _addr6(core, f"n{k}", c6)
                _addr6(inner, "core", a6)
                inner.route(f"{cfg.core_addr6}/128", via=c6.split("/")[0])
                back6.append((a6.split("/")[0], 1))
            # Return traffic toward a site. GRE sites: ECMP over every node
            # (any worker encapsulates). strongSwan sites: via the site's home
            # node only — kernel-libipsec cannot turn anti-replay off (a fixed
            # 128-packet window in strongSwan 5.9), so the tunnel runs with
            # replay_protection and one owner worker sends its ESP (DESIGN §5);
            # interleaving two nodes' sequence counters would be dropped.
            for site in cfg.sites_of(acct.id):
                iface_net = str(ipaddress.IPv4Interface(site.interface_address).network)
                home = cfg.home_node(site)
                for p in (site.lan, iface_net):
                    if home is None and len(back) > 1:
                        core.route(p, multipath=back)
                    else:
                        core.route(p, via=back[(home or 1) - 1][0])
                if site.lan6 and home is None:
                    core.route(site.lan6, multipath=back6)
                # site-to-site: decrypted packets for a strongSwan site that
                # arrive on another node go back to the core, which sends
                # them to the site's home node.
                if home is not None:
                    for k in range(1, cfg.nodes + 1):
                        if k == home:
                            continue
                        inner = self.ns[f"node{k}-{acct.id}"]
                        c_side, _ = cfg.inner(k)
                        inner.ipr.rule(
                            "add",
                            iifname="aw0",
                            dst=site.lan,
                            dst_len=int(site.lan.split("/")[1]),
                            table=100,
                            priority=100,
                        )
                        inner.route("default", via=c_side.split("/")[0], table=100, replace=True)

        # sites
        for i, site in enumerate(cfg.sites):
            self._build_site(edge, site, i)

    def _build_site(self, edge: Any, site: Site, i: int) -> None:
        router = self._namespace(site.name)
        router.enable_forwarding()
        router.sysctl("net.ipv4.conf.all.rp_filter", 0)
        lan = self._namespace(f"{site.name}-lan")
        wan_edge = _with_len(site.wan, 1)
        if site.nat:
            nat = self._namespace(f"{site.name}-nat")
            nat.enable_forwarding()
            self.topo.veth(
                edge, f"s{i}", nat, "wan", addr_a=wan_edge, addr_b=_with_len(site.wan, 2)
            )
            nat.route("default", via=_host(site.wan, 1))
            self.topo.veth(
                nat,
                "in",
                router,
                "wan",
                addr_a=_with_len(site.nat, 1),
                addr_b=_with_len(site.nat, 2),
            )
            router.route("default", via=_host(site.nat, 1))
            nat.nft(
                "table ip nat {\n"
                " chain post {\n  type nat hook postrouting priority 100; policy accept;\n"
                '  oifname "wan" masquerade\n }\n}\n'
            )
        else:
            self.topo.veth(
                edge, f"s{i}", router, "wan", addr_a=wan_edge, addr_b=_with_len(site.wan, 2)
            )
            router.route("default", via=_host(site.wan, 1))
        self.topo.veth(
            router,
            "lan",
            lan,
            "eth0",
            addr_a=_with_len(site.lan, 1),
            addr_b=_with_len(site.lan, 10),
        )
        lan.route("default", via=site.lan_router)
        if site.lan6:
            _addr6(router, "lan", _with_len(site.lan6, 1))
            _addr6(lan, "eth0", _with_len(site.lan6, 10))
            lan.route("::/0", via=_host(site.lan6, 1))

    # -- core services ----------------------------------------------------------------
    def start_core_services(self) -> None:
        cfg = self.cfg
        www = cfg.run_dir / "www"
        for acct in cfg.accounts:
            core = self.ns[next(a.core for a in cfg.accounts if a.id == acct.id)]
            root = www / acct.id
            root.mkdir(parents=True, exist_ok=True)
            (root / "index.html").write_text(f"anywan lab: core of account {acct.id}\n")
            for port in CORE_PORTS:
                if "iperf3" not in self.missing:
                    self.spawn(
                        core,
                        f"iperf3-{acct.id}-{port}",
                        ["iperf3", "-s", "-B", cfg.core_addr, "-p", str(port)],
                    )
            self.spawn(
                core,
                f"web-{acct.id}",
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    str(HTTP_PORT),
                    "--bind",
                    cfg.core_addr,
                    "--directory",
                    str(root),
                ],
            )

    # -- control ---------------------------------------------------------------------
    def _control_argv(
        self,
        *args: str,
        lifetimes: dict[str, float] | None = None,
        dpd_interval: float | None = None,
    ) -> list[str]:
        cfg = self.cfg
        argv = [
            *entry_point("anywan-control", "control.cli"),
            "--config",
            str(ANYWAN_CONFIG),
            "--state-dir",
            str(cfg.run_dir / "control"),
            "--id-suffix",
            cfg.id_suffix,
        ]
        life = {"child": cfg.child_lifetime, "ike": cfg.ike_lifetime, **(lifetimes or {})}
        for kind, secs in life.items():
            if secs is not None:
                argv += [f"--{kind}-lifetime", str(secs)]
        if dpd_interval is not None:
            argv += ["--dpd-interval", str(dpd_interval)]
        return [*argv, *args]

    def start_control(self) -> None:
        cfg = self.cfg
        control = self.ns["control"]
        state = cfg.run_dir / "control"
        keys = state / "keys"
        for args in (
            ["init"],
            ["keygen"],
            *[["keygen", "--worker", f"node{k}"] for k in range(1, cfg.nodes + 1)],
        ):
            res = control.run(self._control_argv(*args), check=False, timeout=60)
            if res.returncode != 0:
                self.missing["control"] = (
                    f"anywan-control {' '.join(args)} failed: {res.stderr.strip()[-300:]}"
                )
                return
        res = control.run(
            self._control_argv("token", "create", "--operator", "--description", "lab"), check=False
        )
        if res.returncode != 0:
            self.missing["control"] = (
                f"anywan-control token create failed: {res.stderr.strip()[-300:]}"
            )
            return
        self.token = res.stdout.strip().splitlines()[-1]
        token_file = cfg.run_dir / "operator.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token + "\n")
        self.state["token_file"] = str(token_file)
        self.state["keys"] = str(keys)
        self.spawn(control, "control", self._control_argv("serve"))
        self.api = Api(control.name, cfg.api_url, self.token)
        ok = wait_until(
            lambda: http_get(control.name, f"{cfg.api_url}/healthz", 1.0)[0] == 200, 20, 0.2
        )
        if not ok:
            self.missing["control"] = (
                "anywan-control serve did not answer /healthz in 20 s: "
                + self.log_tail("control", 8)
            )
            self.api = None
            return
        _, body = http_get(control.name, f"{cfg.api_url}/healthz", 2.0)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ike = json.loads(body)["result"]["ike"]
            if ike != "running":
                self.missing["ike"] = (
                    f"control reports IKE {ike!r}: the worker relay is not wired into "
                    "control/service.py yet, so strongSwan sites get no answer"
                )

    def restart_control(
        self,
        *,
        lifetimes: dict[str, float] | None = None,
        dpd_interval: float | None = None,
        kill: bool = False,
    ) -> float:
        """Restart control (SIGTERM, or SIGKILL with ``kill``: a crash, no
        final save); returns seconds until healthy. ``lifetimes`` ({"child": s,
        "ike": s}) overrides the configured SA lifetimes for SAs negotiated by
        the restarted control (rekey tests), ``dpd_interval`` its DPD interval."""
        proc = self.procs["control"]
        if kill and proc.poll() is None:
            proc.kill()
        self.topo.stop(proc)
        t0 = time.monotonic()
        argv = self._control_argv("serve", lifetimes=lifetimes, dpd_interval=dpd_interval)
        self.spawn(self.ns["control"], "control", argv)
        wait_until(
            lambda: http_get(self.ns["control"].name, f"{self.cfg.api_url}/healthz", 1.0)[0] == 200,
            20,
            0.1,
        )
        return time.monotonic() - t0

    # -- workers ---------------------------------------------------------------------
    def worker_name(self, k: int, i: int) -> str:
        return f"worker-node{k}-{i}"

    def _worker_argv(self, k: int, i: int) -> list[str]:
        cfg = self.cfg
        keys = cfg.run_dir / "control" / "keys"
        return [
            *entry_point("anywan-worker", "dataplane.cli"),
            "--config",
            str(ANYWAN_CONFIG),
            "--netns",
            cfg.ns(f"node{k}"),
            "--anycast",
            cfg.anycast,
            "--node",
            f"node{k}",
            "--index",
            str(i),
            "--workers",
            str(cfg.worker_count),
            "--run-dir",
            str(cfg.run_dir / f"node{k}"),
            "--netns-template",
            cfg.ns(f"node{k}-{{account}}"),
            "--metrics-port",
            str(cfg.worker_metrics_port + i),
            "--bus-server-key",
            str(keys / "control.pub"),
            "--bus-client-key",
            str(keys / "workers" / f"node{k}.key"),
        ]

    def start_worker(self, k: int, i: int) -> subprocess.Popen[Any]:
        # --netns makes the worker enter the node's namespace itself (so the
        # account namespaces it may create stay visible to everyone); it is
        # started from the root namespace, and `down` finds it by namespace.
        return self.spawn(self.topo.root, self.worker_name(k, i), self._worker_argv(k, i))

    def start_workers(self) -> None:
        cfg = self.cfg
        for k in range(1, cfg.nodes + 1):
            for i in range(cfg.worker_count):
                self.start_worker(k, i)
        control = self.ns["control"]

        def all_up() -> bool:
            return all(
                http_get(control.name, url, 1.0)[0] == 200 for url in self.worker_metrics_urls()
            )

        if not wait_until(all_up, 20, 0.3):
            down_ = [
                n for n, p in self.procs.items() if n.startswith("worker") and p.poll() is not None
            ]
            detail = "; ".join(f"{n}: {self.log_tail(n, 3)}" for n in down_[:2])
            self.missing["worker"] = f"workers did not serve /metrics in 20 s {detail}"

    def worker_metrics_urls(self) -> list[str]:
        cfg = self.cfg
        return [
            f"http://{cfg.node_mgmt(k)}:{cfg.worker_metrics_port + i}/metrics"
            for k in range(1, cfg.nodes + 1)
            for i in range(cfg.worker_count)
        ]

    # -- prometheus ------------------------------------------------------------------
    def start_prometheus(self) -> None:
        cfg = self.cfg
        if "prometheus" in self.missing:
            return
        pdir = cfg.run_dir / "prometheus"
        (pdir / "targets").mkdir(parents=True, exist_ok=True)
        shutil.copy(PROMETHEUS_CONFIG, pdir / "prometheus.yml")
        control_t = [
            {"targets": [f"{cfg.control_addr}:{cfg.metrics_port}"], "labels": {"node": "control"}}
        ]
        worker_t = [
            {
                "targets": [
                    f"{cfg.node_mgmt(k)}:{cfg.worker_metrics_port + i}"
                    for i in range(cfg.worker_count)
                ],
                "labels": {"node": f"node{k}"},
            }
            for k in range(1, cfg.nodes + 1)
        ]
        (pdir / "targets" / "control.json").write_text(json.dumps(control_t, indent=1))
        (pdir / "targets" / "worker.json").write_text(json.dumps(worker_t, indent=1))
        self.spawn(
            self.ns["control"],
            "prometheus",
            [
                "prometheus",
                f"--config.file={pdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={pdir / 'data'}",
                f"--web.listen-address=0.0.0.0:{cfg.prometheus_port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
        )

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.cfg.control_addr}:{self.cfg.prometheus_port}"

    # -- provisioning through the API ------------------------------------------------
    def provision(self) -> None:
        if self.api is None:
            return
        for acct in self.cfg.accounts:
            for site in self.cfg.sites_of(acct.id):
                st = self.sites[site.name]
                try:
                    provision_site(self.api, self.cfg, site, st)
                except ApiError as exc:
                    st.status = f"API refused the tunnel: {exc}"
                    self.log(f"lab: {site.name}: {st.status}")

    # -- sites -----------------------------------------------------------------------
    def start_sites(self) -> None:
        """GRE routers, then every strongSwan site started and initiated in
        parallel (an IKE timeout costs seconds; three in a row would add up)."""
        threads = []
        for site in self.cfg.sites:
            st = self.sites[site.name]
            if site.kind == "gre":
                self._start_gre_site(st)
            else:
                t = threading.Thread(target=self._start_ipsec_site, args=(st,), daemon=True)
                t.start()
                threads.append(t)
        for t in threads:
            t.join(60)

    def _start_gre_site(self, st: SiteState) -> None:
        cfg, site = self.cfg, st.site
        others = [s.lan for s in cfg.sites_of(site.account) if s is not site]
        argv = [
            sys.executable,
            "-m",
            "deploy.gre_site",
            f"--local={site.router_addr}",
            f"--remote={cfg.anycast}",
            f"--address={site.customer_side}",
            f"--route={_net(cfg.core_host)}",
            *[f"--route={p}" for p in others],
            *([f"--route={cfg.core_addr6}/128"] if site.lan6 else []),
        ]
        self.spawn(self.ns[site.name], site.name, argv)
        st.gre = self.procs[site.name]
        st.status = "GRE router running" + (
            ""
            if st.tunnel_id
            else " (no tunnel in control: "
            + (self.missing.get("control") or "not provisioned")
            + ")"
        )

    def _start_ipsec_site(self, st: SiteState) -> None:
        if "charon" in self.missing or "swanctl" in self.missing:
            st.status = "strongSwan missing: " + (
                self.missing.get("charon") or self.missing["swanctl"]
            )
            return
        if st.psk is None:
            st.status = (
                "not started: no tunnel/PSK from control ("
                + (self.missing.get("control") or "provisioning failed")
                + ")"
            )
            return
        from deploy.strongswan import Charon, StrongswanError

        ns = self.ns[st.site.name]
        charon = Charon(ns, self.cfg.run_dir / "sites" / st.site.name, name=st.site.name)
        st.charon = charon
        try:
            charon.start()
            self._record_pid(f"charon-{st.site.name}", charon.proc.pid)
            charon.load([site_connection(self.cfg, st)])
        except StrongswanError as exc:
            st.status = f"strongSwan failed: {exc}"
            return
        if "worker" in self.missing:
            st.status = "strongSwan loaded, not initiated: " + self.missing["worker"]
            return
        try:
            charon.initiate(child="net", timeout=15)
            st.status = "IKE SA established"
        except StrongswanError as exc:
            st.status = f"IKE failed: {str(exc)[-400:]}"

    # -- teardown (in-process) -------------------------------------------------------
    def down(self) -> None:
        down(self.cfg, log=self.log, quiet=True)
        self.topo = None


def set_multipath_hash(ns: Any, policy: int, fields: str) -> int:
    """Set the ECMP hash policy (falling back to 1 where the custom policy 3
    is not supported); returns the policy in effect."""
    for want in (policy, 1) if policy == 3 else (policy,):
        try:
            ns.sysctl("net.ipv4.fib_multipath_hash_policy", want)
            if want == 3:
                ns.sysctl("net.ipv4.fib_multipath_hash_fields", fields)
            return want
        except OSError:
            continue
    raise LabError(f"cannot set fib_multipath_hash_policy {policy}")


def provision_site(api: Api, cfg: LabConfig, site: Site, st: SiteState) -> None:
    """Create the site's tunnel (+PSK) and its LAN route through the API."""
    acct = f"/accounts/{site.account}/magic"
    if site.kind == "ipsec":
        body = {
            "name": site.name,
            "description": f"lab {site.name}",
            "cloudflare_endpoint": cfg.anycast,
            "customer_endpoint": site.public_addr,
            "interface_address": site.our_side,
            # kernel-libipsec always checks sequence numbers (see build_network)
            "replay_protection": True,
        }
        tunnel = api.call("POST", f"{acct}/ipsec_tunnels", body)
        st.tunnel_id = tunnel["id"]
        st.local_id = tunnel["remote_identities"]["fqdn_id"]
        psk = api.call("POST", f"{acct}/ipsec_tunnels/{st.tunnel_id}/psk_generate")
        st.psk = psk["psk"]
    else:
        body = {
            "name": site.name,
            "description": f"lab {site.name}",
            "cloudflare_gre_endpoint": cfg.anycast,
            "customer_gre_endpoint": site.public_addr,
            "interface_address": site.our_side,
        }
        tunnel = api.call("POST", f"{acct}/gre_tunnels", body)
        st.tunnel_id = tunnel["id"]
    nexthop = site.customer_side.split("/")[0]
    for prefix in (site.lan, site.lan6):
        if prefix:
            body = {"prefix": prefix, "nexthop": nexthop, "description": site.name}
            api.call("POST", f"{acct}/routes", body)
    st.status = "provisioned"


def site_connection(cfg: LabConfig, st: SiteState) -> Any:
    """The strongSwan connection of a site, from what the API returned."""
    from deploy.strongswan import Child, Connection

    site = st.site
    remote_ts = [str(_net(cfg.core_host))] + [
        s.lan for s in cfg.sites_of(site.account) if s is not site
    ]
    return Connection(
        name="anywan",
        local_addrs=site.router_addr,
        remote_addrs=cfg.anycast,
        local_id=st.local_id or "",
        remote_id="%any",
        psk=st.psk or "",
        local_port=site.ike_port,
        remote_port=site.ike_port,
        children=(
            Child(
                name="net",
                local_ts=(site.lan,),
                remote_ts=tuple(remote_ts),
                # Magic WAN asks customers to disable anti-replay: every
                # anycast worker sends with its own sequence counter.
                extra={"replay_window": 0},
            ),
        ),
    )


# --------------------------------------------------------------------------
# down / status
# --------------------------------------------------------------------------


def down(cfg: LabConfig, *, quiet: bool = False, log: Any = print) -> list[str]:
    """Remove everything the lab made: recorded processes (by PID, checked
    against their start time), every ``prefix*`` namespace with whatever
    still runs inside, the host link, the run directory."""
    from deploy.netns import cleanup_prefix

    removed: list[str] = []
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(cfg.state_path.read_text())
    for name, (pid, start) in (state.get("pids") or {}).items():
        if _alive(pid) and _proc_start(pid) == start:
            end_pid(pid)
            removed.append(f"process {name} ({pid})")
    for name in cleanup_prefix(cfg.prefix):
        removed.append(f"namespace {name}")
    links = set(state.get("root_links") or []) | {cfg.prefix + "host"}
    with contextlib.suppress(Exception):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for link in links:
                idx = ipr.link_lookup(ifname=link)
                if idx:
                    ipr.link("del", index=idx[0])
                    removed.append(f"link {link}")
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        removed.append(f"directory {cfg.run_dir}")
    if not quiet:
        log("lab down: " + (", ".join(removed) if removed else "nothing was running"))
    return removed


def status(cfg: LabConfig) -> dict[str, Any]:
    """What is running: processes, tunnels (API), SAs (strongSwan + control),
    which worker carries what (worker metrics), metrics URLs."""
    from deploy.netns import list_namespaces

    out: dict[str, Any] = {"namespaces": list_namespaces(cfg.prefix)}
    try:
        state = json.loads(cfg.state_path.read_text())
    except (OSError, ValueError):
        out["running"] = False
        return out
    out["running"] = True
    out["missing"] = state.get("missing", {})
    out["processes"] = {
        name: ("running" if _alive(pid) and _proc_start(pid) == start else "dead")
        for name, (pid, start) in state.get("pids", {}).items()
    }
    out["sites"] = state.get("sites", {})
    token = None
    with contextlib.suppress(OSError, KeyError):
        token = Path(state["token_file"]).read_text().strip()
    control_ns = cfg.ns("control")
    if token:
        api = Api(control_ns, cfg.api_url, token)
        tunnels = []
        for acct in cfg.accounts:
            for kind in ("ipsec_tunnels", "gre_tunnels"):
                with contextlib.suppress(ApiError, ValueError, subprocess.SubprocessError):
                    res = api.call("GET", f"/accounts/{acct.id}/magic/{kind}")
                    items = res.get(kind, []) if isinstance(res, dict) else res or []
                    for t in items:
                        entry = {
                            "account": acct.id,
                            "kind": kind.split("_")[0],
                            "name": t["name"],
                            "id": t["id"],
                        }
                        if kind == "ipsec_tunnels":
                            with contextlib.suppress(ApiError, ValueError):
                                entry["sas"] = api.call(
                                    "GET", f"/accounts/{acct.id}/magic/ipsec_tunnels/{t['id']}/sas"
                                )
                        tunnels.append(entry)
        out["tunnels"] = tunnels
        with contextlib.suppress(ApiError, ValueError, subprocess.SubprocessError):
            out["workers_on_bus"] = api.call("GET", "/workers")
    # strongSwan's view
    sas = {}
    for site in cfg.sites:
        vici = cfg.run_dir / "sites" / site.name / "charon.vici"
        if vici.exists():
            res = subprocess.run(
                ["swanctl", "--list-sas", "--raw", "--uri", f"unix://{vici}"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            from deploy.strongswan import ike_sas

            sas[site.name] = [
                {
                    "state": sa.get("state"),
                    "remote": f"{sa.get('remote-host')}:{sa.get('remote-port')}",
                    "children": [
                        {
                            "state": c.get("state"),
                            "spi_in": c.get("spi-in"),
                            "spi_out": c.get("spi-out"),
                            "packets_in": c.get("packets-in"),
                            "packets_out": c.get("packets-out"),
                        }
                        for c in sa.get("child-sas", [])
                    ],
                }
                for sa in ike_sas(res.stdout)
            ]
    out["strongswan"] = sas
    # which worker carries what: per-worker tunnel packet counters
    carried: dict[str, dict[str, float]] = {}
    workers = [
        (f"node{k}/{i}", f"http://{cfg.node_mgmt(k)}:{cfg.worker_metrics_port + i}/metrics")
        for k in range(1, cfg.nodes + 1)
        for i in range(cfg.worker_count)
    ]
    for wid, url in workers:
        code, body = http_get(control_ns, url, 1.0)
        if code != 200:
            carried[wid] = {"_down": 1}
            continue
        carried[wid] = {
            f"{labels.get('tunnel')} {labels.get('direction')}": value
            for labels, value in scrape.samples(body, "anywan_worker_tunnel_packets_total")
        }
    out["carried"] = carried
    out["urls"] = urls(cfg)
    return out


def urls(cfg: LabConfig) -> dict[str, Any]:
    return {
        "api": cfg.api_url,
        "prometheus": f"http://{cfg.control_addr}:{cfg.prometheus_port}",
        "control_metrics": f"http://{cfg.control_addr}:{cfg.metrics_port}/metrics",
        "worker_metrics": [
            f"http://{cfg.node_mgmt(k)}:{cfg.worker_metrics_port + i}/metrics"
            for k in range(1, cfg.nodes + 1)
            for i in range(cfg.worker_count)
        ],
    }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def print_up(lab: Lab) -> None:
    cfg = lab.cfg
    p = print
    p("")
    p(f"anywan lab is up (prefix {cfg.prefix}, run dir {cfg.run_dir})")
    p(
        f"  edge: {cfg.anycast} -> ECMP over {cfg.nodes} nodes, "
        f"fib_multipath_hash_policy {lab.hash_policy_used}"
    )
    running = sorted(n for n, pr in lab.procs.items() if pr.poll() is None)
    dead = sorted(n for n, pr in lab.procs.items() if pr.poll() is not None)
    p(f"  running: {', '.join(running)}")
    if dead:
        p(f"  exited:  {', '.join(dead)} (logs in {cfg.run_dir}/logs)")
    for name, why in sorted(lab.missing.items()):
        p(f"  MISSING {name}: {why}")
    p("  sites:")
    for st in lab.sites.values():
        s = st.site
        p(f"    {s.name:6} {s.kind:5} account {s.account:7} LAN {s.lan:14} {st.status}")
    u = urls(cfg)
    via = "" if cfg.host_link else f"ip netns exec {cfg.ns('control')} "
    p(
        "  URLs"
        + (
            " (from the host, via the host link)"
            if cfg.host_link
            else f" (run from {cfg.ns('control')})"
        )
        + ":"
    )
    p(f"    REST API     {u['api']}   token: {cfg.run_dir}/operator.token")
    p(f"    Prometheus   {u['prometheus']}")
    p(
        f"    /metrics     {u['control_metrics']}  and {len(u['worker_metrics'])} workers, "
        f"e.g. {u['worker_metrics'][0]}"
    )
    p("  try:")
    core = cfg.core_addr
    first = cfg.sites[0] if cfg.sites else None
    if first:
        lan = cfg.ns(f"{first.name}-lan")
        p(f"    ip netns exec {lan} ping -c3 {core}                 # site -> core")
        p(f"    ip netns exec {lan} iperf3 -c {core} -t 5           # TCP through the tunnel")
        p(f"    ip netns exec {lan} curl http://{core}/             # the core's web service")
        others = [s for s in cfg.sites_of(first.account) if s is not first]
        if others:
            p(f"    ip netns exec {lan} ping -c3 {others[0].lan_host}              # site -> site")
    v6 = next((s for s in cfg.sites if s.lan6), None)
    if v6:
        lan6 = cfg.ns(f"{v6.name}-lan")
        p(f"    ip netns exec {lan6} ping -6 -c3 {cfg.core_addr6}    # IPv6 inner ({v6.name})")
    p(f"    {via}curl -s {u['prometheus']}/api/v1/targets | head -c 300")
    p(
        f"    TOKEN=$(cat {cfg.run_dir}/operator.token); {via}curl -s "
        f'-H "Authorization: Bearer $TOKEN" {u["api"]}/accounts/acme/magic/ipsec_tunnels'
    )
    p("    python -m deploy.lab status      # tunnels, SAs, which worker carries what")
    p("    python -m deploy.lab down        # remove everything")


def print_status(cfg: LabConfig, st: dict[str, Any]) -> None:
    p = print
    if not st["running"]:
        p(
            f"anywan lab ({cfg.prefix}): not running"
            + (f"; leftover namespaces {st['namespaces']} (run down)" if st["namespaces"] else "")
        )
        return
    p(f"anywan lab ({cfg.prefix}): {len(st['namespaces'])} namespaces")
    for name, why in sorted(st.get("missing", {}).items()):
        p(f"  MISSING {name}: {why}")
    p("  processes: " + ", ".join(f"{n}={s}" for n, s in sorted(st["processes"].items())))
    names = {}
    for t in st.get("tunnels", []):
        names[t["id"]] = f"{t['account']}/{t['name']}"
        sas = t.get("sas") or {}
        if t["kind"] == "gre":
            detail = "GRE (stateless: any worker)"
        else:
            kids = ", ".join(
                f"{c.get('direction')} {c.get('spi')} {c.get('cipher')} "
                f"{c.get('remote_addr')}:{c.get('remote_port')}"
                for c in sas.get("child_sas", [])
            )
            detail = f"{len(sas.get('ike_sas', []))} IKE SA(s); child SAs: {kids or 'none'}"
        p(f"  tunnel {t['account']}/{t['name']} ({t['kind']} {t['id'][:8]}): {detail}")
    for site, sas in st.get("strongswan", {}).items():
        for sa in sas:
            kids = ", ".join(
                f"child {c['state']} in {c['spi_in']} ({c['packets_in']} pkts) "
                f"out {c['spi_out']} ({c['packets_out']} pkts)"
                for c in sa["children"]
            )
            p(f"  strongSwan {site}: IKE {sa['state']} with {sa['remote']}; {kids}")
    p("  which worker carries what (inner packets per tunnel and direction):")
    for wid, counters in st.get("carried", {}).items():
        if counters.get("_down"):
            p(f"    {wid}: /metrics not answering")
        else:
            parts = []
            for key, v in counters.items():
                tunnel, _, direction = key.partition(" ")
                parts.append(f"{names.get(tunnel, tunnel[:8])} {direction}={v:.0f}")
            p(f"    {wid}: " + (", ".join(parts) or "nothing yet"))
    u = st["urls"]
    p(f"  API {u['api']}  Prometheus {u['prometheus']}  control {u['control_metrics']}")
    p("  workers: " + " ".join(u["worker_metrics"]))


# --------------------------------------------------------------------------
# docker-compose roles: the same code paths, one role per container
# --------------------------------------------------------------------------


def _block_until_signal(procs: list[subprocess.Popen[Any]]) -> int:
    """Wait for SIGTERM/SIGINT (or a child's exit), then end the children by PID."""
    stop = {"now": False}

    def handler(_sig: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop["now"] and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            end_pid(p.pid)
    return 0


def compose_role(command: str, cfg: LabConfig, args: argparse.Namespace) -> int:
    """``provision``, ``site`` and ``core-services`` for deploy/docker-compose.yml:
    what ``up`` does per namespace, done inside one container."""
    psk_dir = Path(args.psk_dir or "/var/lib/anywan/psk")
    if command == "core-services":
        www = Path("/tmp/anywan-www")
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text("anywan compose: core\n")
        procs = [subprocess.Popen(["iperf3", "-s", "-p", str(p)]) for p in CORE_PORTS]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "http.server", str(HTTP_PORT), "--directory", str(www)]
            )
        )
        return _block_until_signal(procs)
    if command == "provision":
        if not args.api:
            raise LabError("provision needs --api URL")
        token = os.environ.get("ANYWAN_API_TOKEN", "")
        if not token:
            res = subprocess.run(
                [
                    *entry_point("anywan-control", "control.cli"),
                    "--config",
                    str(ANYWAN_CONFIG),
                    "token",
                    "create",
                    "--operator",
                    "--description",
                    "compose provision",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if res.returncode != 0:
                raise LabError(f"cannot create an API token: {res.stderr.strip()[-300:]}")
            token = res.stdout.strip().splitlines()[-1]
        api = Api(None, args.api.rstrip("/"), token)
        if not wait_until(lambda: _healthy(api), 120, 1.0):
            raise LabError(f"control at {args.api} did not become healthy in 120 s")
        psk_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for site in cfg.sites:
            if args.name and site.name not in args.name.split(","):
                continue
            st = SiteState(site)
            provision_site(api, cfg, site, st)
            path = psk_dir / f"{site.name}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"tunnel_id": st.tunnel_id, "local_id": st.local_id, "psk": st.psk}, fh)
            print(f"provision: {site.name} tunnel {st.tunnel_id}")
        return 0
    if command == "site":
        from deploy.netns import Topology
        from deploy.strongswan import Charon

        site = next((s for s in cfg.sites if s.name == args.name), None)
        if site is None or site.kind != "ipsec":
            raise LabError(f"site: --name must be one of the strongSwan sites in {args.config}")
        path = psk_dir / f"{site.name}.json"
        if not wait_until(path.exists, 300, 1.0):
            raise LabError(f"site: {path} did not appear (is the provision service done?)")
        data = json.loads(path.read_text())
        st = SiteState(
            site, tunnel_id=data["tunnel_id"], local_id=data["local_id"], psk=data["psk"]
        )
        # the LAN side: the router's LAN address, which strongSwan needs inside local_ts
        subprocess.run(["ip", "addr", "replace", f"{site.lan_router}/32", "dev", "lo"], check=True)
        workdir = Path(args.run_dir or "/var/lib/anywan") / "charon" / site.name
        charon = Charon(Topology("awc-").root, workdir, name=site.name)
        charon.start()
        charon.load([site_connection(cfg, st)])
        for _ in range(30):
            with contextlib.suppress(Exception):
                charon.initiate(child="net", timeout=10)
                break
            time.sleep(2)
        print(f"site {site.name}: {len(charon.established())} IKE SA(s) established", flush=True)
        assert charon.proc is not None
        return _block_until_signal([charon.proc])
    raise LabError(f"unknown command {command}")


def _healthy(api: Api) -> bool:
    try:
        api.call("GET", "/healthz", timeout=2)
        return True
    except (ApiError, ValueError, subprocess.SubprocessError):
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.lab", description="anywan netns lab")
    p.add_argument(
        "command", choices=["up", "down", "status", "provision", "site", "core-services"]
    )
    p.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="lab topology (default deploy/lab.toml)"
    )
    p.add_argument("--prefix", help="namespace prefix (default from the config: aw-)")
    p.add_argument("--run-dir", help="state, logs, keys (default /run/anywan-<prefix>)")
    p.add_argument("--workers-per-node", type=int, help="0 = one per CPU core")
    p.add_argument("--no-host-link", action="store_true", help="no veth from the host to control")
    p.add_argument("--json", action="store_true", help="status as JSON")
    # docker-compose roles (deploy/docker-compose.yml)
    p.add_argument("--api", help="provision: control's API URL")
    p.add_argument("--name", help="site: the site to run")
    p.add_argument(
        "--psk-dir", help="provision/site: where tunnel ids, identities and PSKs are exchanged"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = LabConfig.load(
            Path(args.config),
            prefix=args.prefix,
            run_dir=Path(args.run_dir) if args.run_dir else None,
            host_link=False if args.no_host_link else None,
            workers_per_node=args.workers_per_node,
        )
        if args.command == "up":
            lab = Lab(cfg)
            t0 = time.monotonic()
            lab.up()
            print_up(lab)
            print(f"  (up in {time.monotonic() - t0:.1f}s)")
            return 0
        if args.command == "down":
            down(cfg)
            return 0
        if args.command == "status":
            st = status(cfg)
            if args.json:
                print(json.dumps(st, indent=2, default=str))
            else:
                print_status(cfg, st)
            return 0
        return compose_role(args.command, cfg, args)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
