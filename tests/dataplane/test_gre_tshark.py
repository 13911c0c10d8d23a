"""Our GRE, outer headers, fragments and ICMP errors as Wireshark dissects them.

A second independent implementation next to scapy: the packets are written
to a pcap (LINKTYPE_RAW) and ``tshark`` must find the fields we meant, with
every checksum "Good" (status 1) when checksum validation is switched on.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from dataplane import gre, ip

pytestmark = pytest.mark.tshark

LINKTYPE_RAW = 101
FIELDS = [
    "frame.number",
    "ip.checksum.status",
    "ip.dsfield.ecn",
    "gre.key",
    "gre.sequence_number",
    "gre.checksum.status",
    "gre.proto",
    "udp.srcport",
    "udp.length",
    "esp.spi",
    "icmp.type",
    "icmp.code",
    "icmp.mtu",
    "icmp.checksum.status",
    "icmpv6.type",
    "icmpv6.mtu",
    "icmpv6.checksum.status",
    "ipv6.src",
]

OUT_SRC = ipaddress.ip_address("203.0.113.1").packed
OUT_DST = ipaddress.ip_address("198.51.100.20").packed


def write_pcap(path: Path, packets: list[bytes]) -> None:
    with path.open("wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, LINKTYPE_RAW))
        for i, p in enumerate(packets):
            fh.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(p), len(p)))
            fh.write(p)


def tshark(path: Path) -> list[dict[str, str]]:
    exe = shutil.which("tshark")
    assert exe
    argv = [exe, "-n", "-r", str(path), "-T", "fields", "-E", "separator=\t"]
    argv += ["-o", "ip.check_checksum:TRUE", "-o", "ip.defragment:TRUE"]
    for f in FIELDS:
        argv += ["-e", f]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return [dict(zip(FIELDS, line.split("\t"), strict=True)) for line in res.stdout.splitlines()]


def outer_gre(inner: bytes, proto: int, **opts: object) -> bytes:
    buf = bytearray(2000)
    inner_tos = inner[1] if inner[0] >> 4 == 4 else (struct.unpack_from("!H", inner)[0] >> 4) & 0xFF
    n = gre.encapsulate_into(buf, 20, inner, proto, **opts)  # type: ignore[arg-type]
    ip.write_ipv4_header(
        buf, 0, src=OUT_SRC, dst=OUT_DST, proto=ip.IPPROTO_GRE, payload_len=n,
        tos=ip.ecn_encap(inner_tos), ident=77,
    )  # fmt: skip
    return bytes(buf[: 20 + n])


def test_tshark_agrees(tmp_path: Path) -> None:
    inner4 = raw(IP(src="10.0.0.1", dst="10.1.0.1", tos=0b10) / UDP(sport=1111, dport=53) / b"x")
    inner6 = raw(IPv6(src="2001:db8::1", dst="2001:db8::2", tc=0b01) / UDP(sport=2222) / b"y")
    esp = struct.pack("!II", 0xC0FFEE01, 5) + b"\xaa" * 40
    udp = bytearray(28 + len(esp))
    ip.write_ipv4_header(udp, 0, src=OUT_SRC, dst=OUT_DST, proto=17, payload_len=8 + len(esp))
    ip.write_udp_header(udp, 20, sport=4500, dport=4500, payload_len=len(esp))
    udp[28:] = esp
    big = raw(IP(src="10.0.0.1", dst="10.1.0.1", id=99) / UDP(sport=3333, dport=9) / (b"f" * 3000))
    big_df = raw(IP(src="10.0.0.1", dst="10.1.0.1", flags="DF") / UDP(sport=3333) / (b"d" * 3000))
    big6 = raw(IPv6(src="2001:db8::7", dst="2001:db8::2") / UDP(sport=4444) / (b"g" * 1400))
    gw6 = ipaddress.ip_address("2001:db8:ffff::1").packed
    packets = [
        outer_gre(inner4, gre.ETH_P_IP, key=0x0A0B0C0D, seq=42, checksum=True),  # 1
        outer_gre(inner6, gre.ETH_P_IPV6),  # 2
        bytes(udp),  # 3
        ip.icmp_frag_needed(big_df, 1400, OUT_SRC),  # 4
        ip.icmpv6_packet_too_big(big6, 1280, gw6),  # 5
        *ip.fragment_ipv4(big, 1400),  # 6, 7, 8
    ]
    pcap = tmp_path / "ours.pcap"
    write_pcap(pcap, packets)
    rows = tshark(pcap)
    assert len(rows) == 8
    r = rows[0]
    assert r["ip.checksum.status"].split(",")[0] == "1"  # Good
    assert r["gre.key"] == "0x0a0b0c0d" and r["gre.sequence_number"] == "42"
    assert r["gre.checksum.status"] == "1"
    assert r["gre.proto"] == "0x0800" and r["udp.srcport"] == "1111"
    assert r["ip.dsfield.ecn"].split(",") == ["2", "2"]  # ECT(0) copied to the outer header
    r = rows[1]
    assert r["gre.proto"] == "0x86dd" and r["udp.srcport"] == "2222" and r["gre.key"] == ""
    assert r["ip.dsfield.ecn"] == "1"  # ECT(1) copied
    r = rows[2]
    assert r["udp.srcport"] == "4500" and r["esp.spi"] == "0xc0ffee01"
    r = rows[3]
    assert (r["icmp.type"], r["icmp.code"], r["icmp.mtu"]) == ("3", "4", "1400")
    assert r["icmp.checksum.status"] == "1"
    assert r["ip.checksum.status"] == "1,1"  # ours, and the quoted header intact
    assert r["udp.srcport"] == "3333"  # the 8 quoted bytes
    r = rows[4]
    assert (r["icmpv6.type"], r["icmpv6.mtu"], r["icmpv6.checksum.status"]) == ("2", "1280", "1")
    assert r["ipv6.src"].split(",")[0] == "2001:db8:ffff::1"
    # fragments: tshark reassembles them and finds the whole UDP datagram
    for r in rows[5:]:
        assert r["ip.checksum.status"] == "1"
    assert rows[7]["udp.length"] == str(8 + 3000) and rows[7]["udp.srcport"] == "3333"
