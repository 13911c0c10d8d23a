"""tshark (Wireshark 4.0's ESP dissector, libgcrypt) decrypts our ESP.

One pcap holds, for every transform, an IPv4 and an IPv6 inner packet as raw
ESP (IP protocol 50) and as ESP-in-UDP on port 4500 (RFC 3948), plus one
tampered packet that must show a bad ICV. tshark gets the SAs through its
``esp_sa`` UAT. Wireshark 4.0 names (epan/dissectors/packet-ipsec.c): the
preferences are ``esp.enable_encryption_decode`` and
``esp.enable_authentication_check``; a UAT record is
``"IPv4","src","dst","0xSPI","<encryption>","0x<key>","<authentication>","0x<key>"``
where an AES-GCM key is followed by its 4-octet salt. The keys here are
deterministic test keys, not secrets.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from dataplane.esp import NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, OutboundSa
from replication.records import Cipher, Integ
from tests.dataplane.test_esp import TRANSFORMS, make_record

pytestmark = [
    pytest.mark.tshark,
    pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed"),
]

ENC = {
    Cipher.AES128GCM16: "AES-GCM with 16 octet ICV [RFC4106]",
    Cipher.AES256GCM16: "AES-GCM with 16 octet ICV [RFC4106]",
    Cipher.AES128CBC: "AES-CBC [RFC3602]",
    Cipher.AES256CBC: "AES-CBC [RFC3602]",
    Cipher.NULL: "NULL",
}
AUTH = {
    Integ.NONE: "NULL",
    Integ.SHA256_128: "HMAC-SHA-256-128 [RFC4868]",
    Integ.SHA1_96: "HMAC-SHA-1-96 [RFC2404]",
}
PEER, US = "198.51.100.2", "192.0.2.1"


def _hex(b: bytes) -> str:
    return "0x" + b.hex() if b else ""


def test_tshark_decrypts_every_transform_raw_and_udp(tmp_path: Path) -> None:
    frames = []
    expected: list[tuple[int, str, str]] = []  # (spi, inner src, icv verdict)
    uat = []
    for index, (cipher, integ) in enumerate(TRANSFORMS):
        spi = 0x5000 + index
        rec = make_record(cipher, integ, spi=spi, seed=index + 3)
        out = OutboundSa.from_record(rec, worker_id=index)
        uat.append(
            f'"IPv4","{PEER}","{US}","0x{spi:08x}","{ENC[cipher]}",'
            f'"{_hex(rec.enc_key + rec.salt)}","{AUTH[integ]}","{_hex(rec.integ_key)}"'
        )
        inner4 = IP(src=f"10.9.{index}.1", dst="172.16.0.1") / ICMP(id=index) / b"anywan"
        inner6 = IPv6(src=f"2001:db8:{index}::1", dst="2001:db8:ffff::1") / UDP(dport=7) / b"v6"
        for nh, inner, src in (
            (NEXT_HEADER_IPV4, inner4, inner4.src),
            (NEXT_HEADER_IPV6, inner6, inner6.src),
        ):
            for udp in (False, True):
                esp = out.encapsulate(bytes(inner), nh)
                outer = IP(src=PEER, dst=US)
                l4 = UDP(sport=4500, dport=4500, chksum=0) / Raw(esp) if udp else Raw(esp)
                if not udp:
                    outer.proto = 50
                frames.append(Ether() / outer / l4)
                expected.append((spi, src, "good"))
        # A tampered copy (last octet of the ICV flipped) must be reported bad.
        bad = bytearray(out.encapsulate(bytes(inner4), NEXT_HEADER_IPV4))
        bad[-1] ^= 1
        frames.append(Ether() / IP(src=PEER, dst=US, proto=50) / Raw(bytes(bad)))
        expected.append((spi, "", "bad"))
    pcap = tmp_path / "esp.pcap"
    wrpcap(str(pcap), frames)
    cmd = ["tshark", "-n", "-r", str(pcap),
           "-o", "esp.enable_encryption_decode:TRUE",
           "-o", "esp.enable_authentication_check:TRUE"]  # fmt: skip
    for record in uat:
        cmd += ["-o", f"uat:esp_sa:{record}"]
    cmd += ["-T", "fields", "-E", "separator=|", "-e", "esp.spi", "-e", "esp.icv_good",
            "-e", "esp.icv_bad", "-e", "ip.src", "-e", "ipv6.src", "-e", "udp.dstport"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(expected)
    for line, (spi, inner_src, verdict) in zip(lines, expected, strict=True):
        spi_s, good, bad, ip_src, ip6_src, _ = line.split("|")
        assert int(spi_s, 16) == spi, line
        if verdict == "good":
            assert good in ("1", "True") and bad in ("0", "False"), line
            # The decrypted inner packet was dissected: its source is visible.
            assert inner_src in ip_src.split(",") + ip6_src.split(","), line
        else:
            assert bad in ("1", "True"), line
