"""Network-namespace topologies for tests, the lab and benchmarks (pyroute2).

Links, addresses, routes (including ECMP multipath) and sysctls go through
netlink / ``/proc/sys`` directly; only *processes* are started with
``ip netns exec`` (which also gives them the namespace's ``/etc/netns`` view).

Everything a :class:`Topology` creates — namespaces, root-side veth ends,
processes — is recorded and removed by :meth:`Topology.close`, which runs even
after an exception when the topology is used as a context manager.
:func:`cleanup_prefix` removes what a crashed run left behind (namespaces whose
name starts with the prefix, and every process still inside them, by PID).

Example::

    with Topology("awt-x-") as topo:
        a, b = topo.namespace("a"), topo.namespace("b")
        topo.veth(a, "a0", b, "b0", addr_a="10.0.0.1/24", addr_b="10.0.0.2/24")
        b.route("10.1.0.0/16", multipath=[("10.0.0.1", 1), ("10.0.0.3", 1)])
        proc = a.popen(["python3", "-m", "http.server"])
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

NETNS_RUN_DIR = "/run/netns"
#: How long :meth:`Topology.close` waits after SIGTERM before SIGKILL.
TERM_GRACE = 2.0
#: Seconds :meth:`Namespace.capture` waits for tcpdump to start listening.
CAPTURE_START_TIMEOUT = 10.0


class NetnsError(RuntimeError):
    """A namespace operation failed (names the namespace and the operation)."""


def _split_cidr(cidr: str) -> tuple[str, int]:
    iface = ipaddress.ip_interface(cidr)
    return str(iface.ip), iface.network.prefixlen


def in_namespace(name: str | None, func: Any, *args: Any) -> Any:
    """Run ``func(*args)`` in a fresh thread that has joined namespace ``name``.

    ``setns(CLONE_NEWNET)`` changes only the calling thread, so the rest of
    the process stays where it was. Used for ``/proc/sys/net`` writes, which
    resolve against the writing thread's namespace.
    """
    if name is None:
        return func(*args)
    result: dict[str, Any] = {}

    def runner() -> None:
        try:
            netns.setns(name, flags=0)
            result["value"] = func(*args)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=runner, name=f"setns-{name}", daemon=True)
    thread.start()
    thread.join(10.0)
    if thread.is_alive():
        raise NetnsError(f"{name}: namespace operation timed out")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _write_sysctl(key: str, value: str) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path, "w") as fh:
        fh.write(value)


def _read_sysctl(key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    with open(path) as fh:
        return fh.read().strip()


def list_namespaces(prefix: str = "") -> list[str]:
    """Named namespaces (``/run/netns``) whose name starts with ``prefix``."""
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(name: str) -> list[int]:
    """PIDs of every process whose network namespace is ``name``."""
    try:
        st = os.stat(os.path.join(NETNS_RUN_DIR, name))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            pids.append(int(entry))
    return sorted(pids)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); count it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _end_pids(pids: Iterable[int], grace: float = TERM_GRACE) -> None:
    """SIGTERM each PID, wait up to ``grace`` seconds, then SIGKILL survivors."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove leftovers of a crashed run: every namespace named ``prefix*``
    and every process inside it (ended by PID). Returns the removed names.

    Refuses an empty or very short prefix so it can never sweep the machine.
    """
    if len(prefix) < 3:
        raise ValueError("cleanup_prefix needs a specific prefix (>= 3 characters)")
    removed = []
    for name in list_namespaces(prefix):
        _end_pids(namespace_pids(name))
        with contextlib.suppress(OSError, FileNotFoundError):
            netns.remove(name)
        removed.append(name)
    return removed


def unique_prefix(base: str) -> str:
    """``base + "<pid>-"``: a prefix of this process's own, so two runs of the
    same tests (two people, one machine) never sweep each other's namespaces.
    Namespaces under ``base`` left by processes that are gone are removed."""
    pattern = re.compile(re.escape(base) + r"(\d+)-")
    for name in list_namespaces(base):
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            cleanup_prefix(m.group(0))
    return f"{base}{os.getpid()}-"


class LoopThread:
    """An asyncio event loop (optionally uvloop) in a thread that has joined a
    namespace: sockets it opens live there, while the rest of the test
    process stays in the root namespace. Used to run control's IKE transport
    "inside" a namespace and still reach its engine directly from a test.
    """

    def __init__(self, name: str | None, *, use_uvloop: bool = False) -> None:
        self.name = name
        self.use_uvloop = use_uvloop
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"loop-{name}", daemon=True)

    def _main(self) -> None:
        try:
            if self.name is not None:
                netns.setns(self.name, flags=0)
            if self.use_uvloop:
                import uvloop

                loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            else:
                loop = asyncio.new_event_loop()
            self.loop = loop
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def start(self) -> LoopThread:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise NetnsError(f"loop thread in {self.name}: {self._error}")
        return self

    def run(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        """Run a coroutine on the loop and return its result."""
        assert self.loop is not None

        async def wrapper() -> Any:
            return await coro

        fut = asyncio.run_coroutine_threadsafe(wrapper(), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def call(self, func: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run a plain function on the loop thread and return its result."""

        async def wrapper() -> Any:
            return func(*args)

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)


class Namespace:
    """One network namespace (or the root namespace when ``name`` is None)."""

    def __init__(self, topology: Topology, name: str | None) -> None:
        self.topology = topology
        #: Full namespace name (with the topology's prefix); None = root.
        self.name = name
        self._ipr: Any = None

    def __repr__(self) -> str:
        return f"Namespace({self.name or '<root>'})"

    # -- netlink -----------------------------------------------------------
    @property
    def ipr(self) -> Any:
        """A pyroute2 netlink handle inside this namespace (kept open)."""
        if self._ipr is None:
            self._ipr = IPRoute() if self.name is None else NetNS(self.name, flags=0)
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    def index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetnsError(f"{self}: no interface {ifname!r}")
        return int(found[0])

    def up(self, *ifnames: str) -> None:
        for ifname in ifnames:
            self.ipr.link("set", index=self.index(ifname), state="up")

    def set_link(self, ifname: str, **attrs: Any) -> None:
        """E.g. ``set_link("eth0", mtu=1400)``."""
        self.ipr.link("set", index=self.index(ifname), **attrs)

    def addr(self, ifname: str, cidr: str) -> None:
        """Add an address (``"10.0.0.1/24"`` or ``"2001:db8::1/64"``)."""
        address, prefixlen = _split_cidr(cidr)
        try:
            self.ipr.addr("add", index=self.index(ifname), address=address, prefixlen=prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise

    def addresses(self, ifname: str | None = None) -> list[str]:
        """Addresses as ``"a.b.c.d/len"``, optionally of one interface."""
        kwargs = {"index": self.index(ifname)} if ifname else {}
        return [
            f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}" for m in self.ipr.get_addr(**kwargs)
        ]

    def route(
        self,
        dst: str,
        *,
        via: str | None = None,
        dev: str | None = None,
        multipath: Sequence[tuple[str, int] | tuple[str, int, str]] | None = None,
        table: int | None = None,
        metric: int | None = None,
        replace: bool = False,
    ) -> None:
        """Add a route. ``dst`` is a prefix or ``"default"``.

        ``multipath`` is a list of ``(gateway, weight)`` or
        ``(gateway, weight, dev)``: an ECMP route whose next hops the kernel
        picks by hash (see ``fib_multipath_hash_policy``).
        """
        spec: dict[str, Any] = {}
        if dst == "default":
            spec["dst"] = "0.0.0.0/0"
        else:
            net = ipaddress.ip_network(dst, strict=False)
            spec["dst"] = str(net)
            if net.version == 6:
                spec["family"] = 10
        if via:
            spec["gateway"] = via
        if dev:
            spec["oif"] = self.index(dev)
        if table is not None:
            spec["table"] = table
        if metric is not None:
            spec["priority"] = metric
        if multipath:
            hops = []
            for hop in multipath:
                entry: dict[str, Any] = {"gateway": hop[0], "hops": max(0, hop[1] - 1)}
                if len(hop) > 2:
                    entry["oif"] = self.index(hop[2])  # type: ignore[misc]
                hops.append(entry)
            spec["multipath"] = hops
        self.ipr.route("replace" if replace else "add", **spec)

    def routes(self) -> list[dict[str, Any]]:
        """Routes of the main table as small dicts (dst, gateway, oif, multipath)."""
        out = []
        for msg in self.ipr.get_routes(table=254):
            dst = msg.get_attr("RTA_DST")
            entry: dict[str, Any] = {
                "dst": f"{dst}/{msg['dst_len']}" if dst else "default",
                "gateway": msg.get_attr("RTA_GATEWAY"),
                "oif": msg.get_attr("RTA_OIF"),
            }
            mp = msg.get_attr("RTA_MULTIPATH")
            if mp:
                entry["multipath"] = [
                    (h.get_attr("RTA_GATEWAY"), h["hops"] + 1, h["oif"]) for h in mp
                ]
            out.append(entry)
        return out

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Write (if ``value`` is given) and read a sysctl in this namespace,
        e.g. ``sysctl("net.ipv4.ip_forward", 1)``."""
        if value is not None:
            in_namespace(self.name, _write_sysctl, key, str(value))
        return str(in_namespace(self.name, _read_sysctl, key))

    def enable_forwarding(self, *, multipath_hash_policy: int | None = None) -> None:
        """IPv4/IPv6 forwarding on; optionally ``fib_multipath_hash_policy``
        (0 = L3, 1 = L4 5-tuple, 2 = L3 or inner L3)."""
        self.sysctl("net.ipv4.ip_forward", 1)
        self.sysctl("net.ipv6.conf.all.forwarding", 1)
        if multipath_hash_policy is not None:
            self.sysctl("net.ipv4.fib_multipath_hash_policy", multipath_hash_policy)
            self.sysctl("net.ipv6.fib_multipath_hash_policy", multipath_hash_policy)

    def loop_thread(self, *, use_uvloop: bool = False) -> LoopThread:
        """Start an event loop in a thread inside this namespace (stopped by
        the topology's close)."""
        lt = LoopThread(self.name, use_uvloop=use_uvloop).start()
        self.topology._loops.append(lt)
        return lt

    # -- processes -----------------------------------------------------------
    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so it runs inside this namespace."""
        if self.name is None:
            return list(argv)
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in this namespace; the topology ends it (by PID)
        on close. ``ip netns exec`` execs the command, so ``proc.pid`` is the
        command itself. Each process gets its own session (process group)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv), **kwargs)
        self.topology._processes.append(proc)
        return proc

    def capture(
        self, ifname: str, path: str, bpf: Sequence[str] = ("udp",)
    ) -> subprocess.Popen[Any]:
        """Start ``tcpdump`` on ``ifname`` writing a pcap to ``path``; returns
        once it is listening. Stop it with ``topology.stop(proc)``: packets
        are written as they arrive (``--immediate-mode -U``), so nothing is
        lost at SIGTERM. Runs as root (``-Z root``) so any path works."""
        argv = ["tcpdump", "-i", ifname, "-U", "--immediate-mode", "-Z", "root", "-w", path]
        proc = self.popen([*argv, *bpf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        # tcpdump prints "listening on ..." in one write once the capture is
        # open; wait for it with a bound, so a stuck tcpdump cannot hang us.
        ready, _, _ = select.select([proc.stderr], [], [], CAPTURE_START_TIMEOUT)
        line = proc.stderr.readline() if ready else b"(no output)"
        if b"listening on" not in line:
            self.topology.stop(proc)
            raise NetnsError(f"{self}: tcpdump did not start: {line!r}")
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command to completion in this namespace (text output)."""
        res = subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and res.returncode != 0:
            raise NetnsError(
                f"{self}: {' '.join(argv[:3])}... exited {res.returncode}: {res.stderr.strip()}"
            )
        return res

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) into this namespace."""
        self.run(["nft", "-f", "-"], input=ruleset)


class Topology:
    """A set of namespaces, links and processes that is torn down as a whole."""

    def __init__(self, prefix: str) -> None:
        if len(prefix) < 3:
            raise ValueError("use a specific namespace prefix, e.g. 'awt-x-'")
        self.prefix = prefix
        self.namespaces: dict[str, Namespace] = {}
        self.root = Namespace(self, None)
        self._root_links: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._loops: list[LoopThread] = []
        self._closed = False

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def namespace(self, name: str) -> Namespace:
        """Create (or return) namespace ``prefix + name`` with ``lo`` up."""
        if name in self.namespaces:
            return self.namespaces[name]
        full = self.prefix + name
        if full in list_namespaces(full):
            raise NetnsError(f"namespace {full} exists already (leftover? cleanup_prefix)")
        netns.create(full)
        ns = Namespace(self, full)
        self.namespaces[name] = ns
        ns.up("lo")
        return ns

    def veth(
        self,
        a: Namespace,
        ifname_a: str,
        b: Namespace,
        ifname_b: str,
        *,
        addr_a: str | Iterable[str] | None = None,
        addr_b: str | Iterable[str] | None = None,
        mtu: int | None = None,
    ) -> None:
        """A veth pair ``a:ifname_a <-> b:ifname_b``, both ends up, with
        optional addresses (a CIDR string or several). Either side may be
        ``topology.root``."""
        for ifname in (ifname_a, ifname_b):
            if len(ifname) > 15:
                raise ValueError(f"interface name too long: {ifname!r}")
        peer: dict[str, Any] = {"ifname": ifname_b}
        if b.name is not None:
            peer["net_ns_fd"] = b.name
        a.ipr.link("add", ifname=ifname_a, kind="veth", peer=peer)
        if a.name is None:
            self._root_links.append(ifname_a)
        if b.name is None:
            self._root_links.append(ifname_b)
        for ns, ifname, addrs in ((a, ifname_a, addr_a), (b, ifname_b, addr_b)):
            if mtu:
                ns.set_link(ifname, mtu=mtu)
            for cidr in [addrs] if isinstance(addrs, str) else addrs or ():
                ns.addr(ifname, cidr)
            ns.up(ifname)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        return list(self._processes)

    def stop(self, proc: subprocess.Popen[Any], grace: float = TERM_GRACE) -> int | None:
        """End one tracked process (SIGTERM, then SIGKILL) and reap it."""
        if proc.poll() is None:
            _end_pids([proc.pid], grace)
        try:
            return proc.wait(timeout=grace + 1)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Remove everything: processes (by PID), namespaces (with any other
        process still inside them), root-side veth ends. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for lt in self._loops:
            with contextlib.suppress(Exception):
                lt.stop()
        live = [p for p in self._processes if p.poll() is None]
        _end_pids([p.pid for p in live])
        for p in self._processes:
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        for ns in self.namespaces.values():
            ns.close()
            if ns.name is None:
                continue
            try:
                _end_pids(namespace_pids(ns.name))
                netns.remove(ns.name)
            except FileNotFoundError:
                pass
            except Exception as exc:
                errors.append(f"{ns.name}: {exc}")
        if self._root_links:
            for ifname in self._root_links:
                with contextlib.suppress(Exception):
                    idx = self.root.ipr.link_lookup(ifname=ifname)
                    if idx:
                        self.root.ipr.link("del", index=idx[0])
        self.root.close()
        if errors:
            raise NetnsError("cleanup incomplete: " + "; ".join(errors))


@contextlib.contextmanager
def topology(prefix: str) -> Iterator[Topology]:
    """``with topology("awt-x-") as topo:`` — same as ``with Topology(...)``,
    plus a :func:`cleanup_prefix` first, so a crashed earlier run does not
    make this one fail."""
    cleanup_prefix(prefix)
    topo = Topology(prefix)
    try:
        yield topo
    finally:
        topo.close()
