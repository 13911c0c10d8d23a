"""A customer site router built on scapy: the independent ESP/GRE peer for the
worker's netns tests (kernel ESP and GRE are absent on the test machine).

It owns a TUN (its LAN side) and encapsulates what the TUN gives it with
scapy's ``SecurityAssociation`` (raw ESP, or ESP-in-UDP on port 4500) or
scapy's ``GRE`` layer, and decapsulates what arrives from the anycast address
back into the TUN. Runs until SIGTERM or ``--duration``; prints counters as
JSON on exit. Slow (scapy per packet) but exactly what we need: an
implementation that shares no code with the worker.

Extra: ``--inject FILE`` (a JSON list of hex packets) sends crafted outer
payloads once at start, for the drop tests.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import GRE
from scapy.packet import Raw

TUNSETIFF = 0x400454CA


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), 0x0001 | 0x1000))
    return fd


def sa_pair(args: argparse.Namespace) -> tuple[SecurityAssociation, SecurityAssociation]:
    def make(spi: int, key: str, salt: str, ikey: str, tunnel: bool) -> SecurityAssociation:
        kw: dict[str, object] = {}
        if args.cipher == "gcm":
            kw.update(crypt_algo="AES-GCM", crypt_key=bytes.fromhex(key + salt), crypt_icv_size=16)
        else:
            kw.update(
                crypt_algo="AES-CBC",
                crypt_key=bytes.fromhex(key),
                auth_algo="SHA2-256-128",
                auth_key=bytes.fromhex(ikey),
            )
        if tunnel:
            kw["tunnel_header"] = IP(src=args.local, dst=args.remote)
        return SecurityAssociation(ESP, spi=spi, **kw)

    out = make(args.spi_out, args.key_out, args.salt_out, args.ikey_out, True)
    inn = make(args.spi_in, args.key_in, args.salt_in, args.ikey_in, True)
    return out, inn


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["esp", "udp", "gre"], required=True)
    p.add_argument("--local", required=True)
    p.add_argument("--remote", required=True)
    p.add_argument("--tun", required=True)
    p.add_argument("--addr", action="append", default=[])
    p.add_argument("--route", action="append", default=[])
    p.add_argument("--cipher", choices=["gcm", "cbc"], default="gcm")
    for side in ("out", "in"):
        p.add_argument(f"--spi-{side}", type=lambda x: int(x, 0), default=0)
        p.add_argument(f"--key-{side}", default="")
        p.add_argument(f"--salt-{side}", default="")
        p.add_argument(f"--ikey-{side}", default="")
    p.add_argument("--gre-key", type=int, default=None)
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--ready", default="")
    p.add_argument("--seq-log", default="", help="append each received ESP sequence number and IV")
    args = p.parse_args()

    tun = open_tun(args.tun)
    subprocess.run(["ip", "link", "set", args.tun, "up", "mtu", "1400"], check=True)
    for a in args.addr:
        subprocess.run(["ip", "addr", "add", a, "dev", args.tun], check=True)
    for r in args.route:
        subprocess.run(["ip", "route", "replace", r, "dev", args.tun], check=True)

    if args.mode == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((args.local, 4500))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50 if args.mode == "esp" else 47)
        sock.bind((args.local, 0))
    sock.setblocking(False)
    sa_out = sa_in = None
    if args.mode != "gre":
        sa_out, sa_in = sa_pair(args)

    seq_log = open(args.seq_log, "a") if args.seq_log else None  # noqa: SIM115
    counts = {"tx": 0, "rx": 0, "rx_bad": 0}
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    if args.ready:
        with open(args.ready, "w") as fh:
            fh.write("ready")
    end = time.monotonic() + args.duration
    while not stop and time.monotonic() < end:
        r, _, _ = select.select([tun, sock], [], [], 0.2)
        if tun in r:
            try:
                inner = os.read(tun, 2048)
            except BlockingIOError:
                inner = b""
            if inner:
                pkt = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
                if args.mode == "gre":
                    g = GRE(proto=0x0800 if inner[0] >> 4 == 4 else 0x86DD)
                    if args.gre_key is not None:
                        g.key_present = 1
                        g.key = args.gre_key
                    sock.sendto(bytes(g / Raw(inner)), (args.remote, 0))
                else:
                    assert sa_out is not None
                    enc = sa_out.encrypt(pkt)
                    data = bytes(enc[ESP])
                    if args.mode == "udp":
                        sock.sendto(data, (args.remote, 4500))
                    else:
                        sock.sendto(data, (args.remote, 0))
                counts["tx"] += 1
        if sock in r:
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                continue
            try:
                if args.mode == "gre":
                    outer = IP(data)
                    g = outer[GRE]
                    inner = bytes(g.payload)
                elif args.mode == "esp":
                    assert sa_in is not None
                    inner = bytes(sa_in.decrypt(IP(data)))
                    if seq_log is not None:
                        ihl = (data[0] & 0x0F) * 4
                        seq = struct.unpack_from("!I", data, ihl + 4)[0]
                        seq_log.write(f"{seq} {data[ihl + 8 : ihl + 16].hex()}\n")
                        seq_log.flush()
                else:
                    assert sa_in is not None
                    if data[:4] == b"\x00\x00\x00\x00" or data == b"\xff":
                        continue
                    wrapped = IP(bytes(IP(src=addr[0], dst=args.local, proto=50) / Raw(data)))
                    inner = bytes(sa_in.decrypt(wrapped))
                os.write(tun, inner)
                counts["rx"] += 1
            except Exception:
                counts["rx_bad"] += 1
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
