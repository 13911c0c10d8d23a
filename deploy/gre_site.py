"""A customer's GRE router in userspace: the lab's site C.

The lab kernel has no GRE (``ip link add type gre`` fails), so this small
router stands in for the customer's device: a TUN device on the LAN side
(the tunnel interface, with the customer end of the tunnel's /31) and a raw
IPv4 socket for protocol 47 on the WAN side.

It carries its own GRE codec on purpose instead of importing
``dataplane.gre``: a site is the *other* implementation that anywan's GRE has
to interoperate with, as strongSwan is for IPsec. Only what a plain router
sends is supported: RFC 2784 base header, optional RFC 2890 key, IPv4 and
IPv6 payloads. Everything else that arrives is counted and dropped.

Run inside the site's namespace (the lab does this)::

    python -m deploy.gre_site --local 198.51.100.10 --remote 203.0.113.1 \\
        --address 10.255.0.5/31 --route 10.200.0.0/24 --route 10.10.1.0/24

It prints ``ready`` once the TUN is up and routes are in, then forwards until
SIGTERM/SIGINT, and prints its counters as one JSON line on exit (and on
SIGUSR1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
from dataclasses import asdict, dataclass

IPPROTO_GRE = 47
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
GRE_KEY_PRESENT = 0x2000
# RFC 2784 §2.1: C bit, reserved0 (incl. RFC 1701 R, K, S, s, Recur), version.
GRE_CHECKSUM_PRESENT = 0x8000
GRE_SEQ_PRESENT = 0x1000
GRE_VERSION_MASK = 0x0007

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_HDR = struct.Struct("!HH")
_KEY = struct.Struct("!I")


@dataclass
class Counters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_wrong_peer: int = 0
    rx_malformed: int = 0
    rx_wrong_key: int = 0
    tx_not_ip: int = 0


def gre_header(protocol: int, key: int | None) -> bytes:
    """RFC 2784 §2 base header (no checksum), plus the RFC 2890 §2.1 key."""
    if key is None:
        return _HDR.pack(0, protocol)
    return _HDR.pack(GRE_KEY_PRESENT, protocol) + _KEY.pack(key)


def parse_gre(packet: bytes, expect_key: int | None) -> bytes | None:
    """The payload of a GRE packet (without the outer IPv4 header), or None.

    RFC 2784 §2.5: a receiver may ignore the checksum; we only skip it.
    RFC 2890 §2.1: with a configured key, packets without it (or with another)
    are not ours.
    """
    if len(packet) < 4:
        return None
    flags, protocol = _HDR.unpack_from(packet)
    if flags & GRE_VERSION_MASK or protocol not in (ETH_P_IP, ETH_P_IPV6):
        return None
    off = 4
    if flags & GRE_CHECKSUM_PRESENT:
        off += 4
    key = None
    if flags & GRE_KEY_PRESENT:
        if len(packet) < off + 4:
            return None
        (key,) = _KEY.unpack_from(packet, off)
        off += 4
    if flags & GRE_SEQ_PRESENT:
        off += 4
    if key != expect_key or len(packet) <= off:
        return None
    return packet[off:]


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


def configure(name: str, address: str, mtu: int, routes: list[str]) -> None:
    from pyroute2 import IPRoute

    iface = ipaddress.ip_interface(address)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, mtu=mtu, state="up")
        ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for prefix in routes:
            net = ipaddress.ip_network(prefix, strict=False)
            spec = {"dst": str(net), "oif": idx}
            if net.version == 6:
                spec["family"] = socket.AF_INET6
            ipr.route("replace", **spec)


class GreSite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.local = args.local
        self.remote = args.remote
        self.remote_packed = socket.inet_aton(args.remote)
        self.key: int | None = args.key
        self.counters = Counters()
        self.tun = open_tun(args.tun)
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_GRE)
        self.raw.bind((args.local, 0))
        self.raw.setblocking(False)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        configure(args.tun, args.address, args.mtu, args.route)
        self.running = True

    def from_lan(self) -> None:
        """TUN → GRE → WAN, until the TUN queue is empty."""
        c = self.counters
        for _ in range(256):
            try:
                inner = os.read(self.tun, 65535)
            except BlockingIOError:
                return
            version = inner[0] >> 4 if inner else 0
            if version not in (4, 6):
                c.tx_not_ip += 1
                continue
            protocol = ETH_P_IP if version == 4 else ETH_P_IPV6
            data = gre_header(protocol, self.key) + inner
            with contextlib.suppress(BlockingIOError, OSError):
                self.raw.sendto(data, (self.remote, 0))
                c.tx_packets += 1
                c.tx_bytes += len(inner)

    def from_wan(self) -> None:
        """WAN → strip IPv4 + GRE → TUN, until the socket is empty."""
        c = self.counters
        for _ in range(256):
            try:
                packet = self.raw.recv(65535)
            except BlockingIOError:
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                c.rx_malformed += 1
                continue
            if packet[12:16] != self.remote_packed:
                c.rx_wrong_peer += 1
                continue
            ihl = (packet[0] & 0x0F) * 4
            payload = parse_gre(packet[ihl:], self.key)
            if payload is None:
                flags = _HDR.unpack_from(packet, ihl)[0] if len(packet) >= ihl + 4 else 0
                if flags & GRE_KEY_PRESENT or self.key is not None:
                    c.rx_wrong_key += 1
                else:
                    c.rx_malformed += 1
                continue
            with contextlib.suppress(OSError):
                os.write(self.tun, payload)
                c.rx_packets += 1
                c.rx_bytes += len(payload)

    def report(self) -> None:
        print(json.dumps(asdict(self.counters)), flush=True)

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.tun, select.POLLIN)
        poller.register(self.raw.fileno(), select.POLLIN)
        while self.running:
            try:
                events = poller.poll(200)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == self.tun:
                    self.from_lan()
                else:
                    self.from_wan()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gre_site", description=__doc__.split("\n\n")[0])
    p.add_argument("--local", required=True, help="our WAN address (GRE source)")
    p.add_argument("--remote", required=True, help="anycast address (GRE destination)")
    p.add_argument("--address", required=True, help="tunnel interface address, a.b.c.d/len")
    p.add_argument("--tun", default="gre0", help="TUN device name (default gre0)")
    p.add_argument("--mtu", type=int, default=1476, help="tunnel MTU (default 1476)")
    p.add_argument("--key", type=lambda s: int(s, 0), default=None, help="RFC 2890 key")
    p.add_argument(
        "--route", action="append", default=[], help="prefix to send into the tunnel (repeat)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        site = GreSite(args)
    except OSError as exc:
        print(f"gre_site: {exc}", file=sys.stderr)
        return 1

    def stop(_sig: int, _frame: object) -> None:
        site.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda _s, _f: site.report())
    print("ready", flush=True)
    site.run()
    site.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
