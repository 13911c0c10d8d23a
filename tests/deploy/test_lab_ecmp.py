"""What the lab's edge hashing does to ESP, ESP-in-UDP and GRE on this kernel.

The edge reaches the anycast address over an ECMP route to two nodes, with
the hash policy ``deploy.lab.set_multipath_hash`` sets (3, fields 0x0cf7;
1 where 3 is missing). scapy sends 64 ESP packets with distinct SPIs, 64
GRE packets with distinct inner flows and 64 packets of one ESP-in-UDP flow;
nftables counters on the nodes show where each went. Prefix ``awt-l-e-``.
"""

from __future__ import annotations

import re
import sys

import pytest

from deploy.lab import set_multipath_hash

pytestmark = pytest.mark.netns
PREFIX = "awt-l-e-"

SEND = r"""
from scapy.all import IP, ESP, UDP, GRE, Raw, send, conf
conf.verb = 0
src, dst = "198.51.100.2", "203.0.113.1"
pk = [IP(src=src, dst=dst) / ESP(spi=0x1000 + i, seq=1) / Raw(b"x" * 40) for i in range(64)]
pk += [IP(src=src, dst=dst) / GRE() / IP(src="10.0.0.%d" % i, dst="10.1.0.1")
       / UDP(sport=1000 + i, dport=53) for i in range(64)]
pk += [IP(src=src, dst=dst) / UDP(sport=4500, dport=4500) / ESP(spi=0x2000 + i, seq=1)
       / Raw(b"x" * 40) for i in range(64)]
send(pk)
"""

COUNTERS = """table inet c {
 chain i {
  type filter hook prerouting priority 0
  ip protocol esp counter
  ip protocol gre counter
  udp dport 4500 counter
 }
}
"""


def counts(ns) -> tuple[int, int, int]:
    text = ns.run(["nft", "list", "table", "inet", "c"]).stdout
    esp, gre, udp = (int(n) for n in re.findall(r"counter packets (\d+)", text))
    return esp, gre, udp


def test_edge_spreads_esp_by_spi_and_gre_by_inner_flow(netns_topology) -> None:
    topo = netns_topology(PREFIX)
    site, edge, n1, n2 = (topo.namespace(x) for x in ("s", "e", "n1", "n2"))
    topo.veth(site, "wan", edge, "s0", addr_a="198.51.100.2/30", addr_b="198.51.100.1/30")
    topo.veth(edge, "n1", n1, "up", addr_a="172.16.1.1/30", addr_b="172.16.1.2/30")
    topo.veth(edge, "n2", n2, "up", addr_a="172.16.2.1/30", addr_b="172.16.2.2/30")
    site.route("default", via="198.51.100.1")
    edge.enable_forwarding()
    policy = set_multipath_hash(edge, 3, "0x0cf7")
    edge.route("203.0.113.1/32", multipath=[("172.16.1.2", 1), ("172.16.2.2", 1)])
    for n in (n1, n2):
        n.nft(COUNTERS)
    site.run([sys.executable, "-c", SEND], timeout=60)
    (e1, g1, u1), (e2, g2, u2) = counts(n1), counts(n2)
    assert e1 + e2 == 64 and g1 + g2 == 64 and u1 + u2 == 64
    # ESP: the flow dissector reads the SPI as the port pair, so distinct
    # SPIs spread (policy 1 and 3 alike).
    assert min(e1, e2) >= 10, (e1, e2)
    # One ESP-in-UDP flow (one site behind a NAT): one node.
    assert {u1, u2} == {0, 64}
    if policy == 3:
        # GRE by its inner flow (inner address and port fields of 0x0cf7).
        assert min(g1, g2) >= 10, (g1, g2)
    else:
        assert {g1, g2} == {0, 64}
