"""deploy/gre_site.py (the lab's userspace GRE customer router) against scapy.

A namespace runs gre_site; a peer namespace answers pings with a responder
that parses and builds GRE with scapy (an independent implementation), so the
site's encapsulation is checked both ways, with and without an RFC 2890 key.
Namespace prefix ``awt-l-g``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from deploy.gre_site import gre_header, parse_gre

PREFIX = "awt-l-g"

# Answers ICMP echo requests that arrive GRE-encapsulated, using scapy only;
# prints one JSON line per GRE packet seen (key, protocol) and exits after
# `secs` seconds.
RESPONDER = r"""
import json, socket, sys, time
from scapy.all import GRE, IP, ICMP, raw
secs, key = float(sys.argv[1]), (int(sys.argv[2]) if sys.argv[2] != "none" else None)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
s.bind(("192.0.2.2", 0)); s.settimeout(0.1)
print("ready", flush=True)
end = time.monotonic() + secs
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(65535)
    except socket.timeout:
        continue
    pkt = IP(data)
    gre = pkt[GRE]
    print(json.dumps({"key": gre.key, "proto": gre.proto, "src": pkt.src}), flush=True)
    inner = gre.payload
    if ICMP in inner and inner[ICMP].type == 8:
        reply = IP(src=inner[IP].dst, dst=inner[IP].src) / ICMP(
            type=0, id=inner[ICMP].id, seq=inner[ICMP].seq) / inner[ICMP].payload
        outer = GRE(proto=0x0800, key_present=1 if key is not None else 0, key=key) / reply
        s.sendto(raw(outer), (peer[0], 0))
"""


def test_header_roundtrip_matches_scapy() -> None:
    from scapy.all import GRE, IP, raw

    inner = raw(IP(src="10.0.0.1", dst="10.0.0.2") / b"payload")
    for key in (None, 0x1234ABCD):
        ours = gre_header(0x0800, key) + inner
        theirs = raw(GRE(proto=0x0800, key_present=int(key is not None), key=key) / inner)
        assert ours == theirs
        assert parse_gre(theirs, key) == inner
    # A keyed packet is not ours when we expect no key, and vice versa.
    keyed = raw(GRE(proto=0x0800, key_present=1, key=7) / inner)
    assert parse_gre(keyed, None) is None
    assert parse_gre(raw(GRE(proto=0x0800) / inner), 7) is None
    # Checksum and sequence fields are skipped (RFC 2784 §2.5, RFC 2890 §2.2).
    both = raw(GRE(proto=0x0800, chksum_present=1, seqnum_present=1, sequence_number=5) / inner)
    assert parse_gre(both, None) == inner
    # Version 1 (PPTP), unknown protocol, truncated: refused.
    assert parse_gre(raw(GRE(proto=0x0800, version=1) / inner), None) is None
    assert parse_gre(raw(GRE(proto=0x6558) / inner), None) is None
    assert parse_gre(b"\x00\x00\x08", None) is None


@pytest.mark.netns
@pytest.mark.parametrize("key", [None, 0x42])
def test_gre_site_talks_to_scapy(netns_topology, key: int | None) -> None:
    topo = netns_topology(PREFIX)
    site, peer = topo.namespace("c"), topo.namespace("r")
    topo.veth(site, "wan", peer, "wan", addr_a="192.0.2.1/24", addr_b="192.0.2.2/24")
    responder = peer.popen(
        [sys.executable, "-c", RESPONDER, "8", str(key) if key is not None else "none"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert responder.stdout is not None
    assert responder.stdout.readline().strip() == "ready"
    argv = [
        sys.executable,
        "-m",
        "deploy.gre_site",
        "--local=192.0.2.1",
        "--remote=192.0.2.2",
        "--address=10.255.0.5/31",
        "--route=10.200.0.0/24",
    ]
    if key is not None:
        argv.append(f"--key={key}")
    gre = site.popen(argv, stdout=subprocess.PIPE, text=True)
    assert gre.stdout is not None
    assert gre.stdout.readline().strip() == "ready"

    ping = site.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.200.0.1"], check=False)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout

    gre.send_signal(signal.SIGTERM)
    out, _ = gre.communicate(timeout=5)
    counters = json.loads(out.strip().splitlines()[-1])
    assert counters["tx_packets"] >= 3 and counters["rx_packets"] >= 3
    assert counters["rx_malformed"] == 0

    responder.send_signal(signal.SIGTERM)
    seen = [json.loads(line) for line in responder.communicate(timeout=5)[0].splitlines()]
    assert seen, "the scapy peer saw no GRE"
    # IPv4 echo requests, plus whatever IPv6 the TUN's link-local sends.
    assert all(s["key"] == key and s["proto"] in (0x0800, 0x86DD) for s in seen), seen
    assert sum(s["proto"] == 0x0800 for s in seen) >= 3
    assert all(s["src"] == "192.0.2.1" for s in seen)
