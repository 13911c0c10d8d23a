"""A two-minute tour of anywan's ESP codec: ``python -m deploy.demo``.

For every Child SA transform anywan supports, build an SA (fresh random keys,
never printed), encrypt an inner IPv4 ICMP echo and an inner IPv6 UDP packet
with anywan's ESP, and hand the result to scapy's independent IPsec code to
decrypt; then the other way round (scapy encrypts, anywan decrypts). Also
shows RFC 3948 classification of what arrives on UDP/4500. This is what
``deploy/lab.sh up`` runs until the netns lab exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet

from dataplane.drops import Drop
from dataplane.esp import NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, InboundSa, OutboundSa
from dataplane.udpencap import NON_ESP_MARKER, classify
from replication.records import (
    AEAD_CIPHERS,
    CIPHER_KEY_BYTES,
    INTEG_KEY_BYTES,
    Cipher,
    Direction,
    Integ,
    SaRecord,
    TrafficSelector,
)

TRANSFORMS = [
    (Cipher.AES128GCM16, Integ.NONE),
    (Cipher.AES256GCM16, Integ.NONE),
    (Cipher.AES128CBC, Integ.SHA256_128),
    (Cipher.AES256CBC, Integ.SHA256_128),
    (Cipher.AES128CBC, Integ.SHA1_96),
    (Cipher.AES256CBC, Integ.SHA1_96),
    (Cipher.NULL, Integ.SHA256_128),
    (Cipher.NULL, Integ.SHA1_96),
]
SCAPY_CRYPT = {
    Cipher.AES128GCM16: "AES-GCM",
    Cipher.AES256GCM16: "AES-GCM",
    Cipher.AES128CBC: "AES-CBC",
    Cipher.AES256CBC: "AES-CBC",
    Cipher.NULL: "NULL",
}
SCAPY_AUTH = {Integ.NONE: None, Integ.SHA256_128: "SHA2-256-128", Integ.SHA1_96: "HMAC-SHA1-96"}
CUSTOMER, ANYCAST = "198.51.100.2", "203.0.113.1"


def record(cipher: Cipher, integ: Integ, spi: int) -> SaRecord:
    ts = (TrafficSelector.from_network("0.0.0.0/0"),)
    return SaRecord(
        account_id="demo", tunnel_id="d" * 32, spi=spi, direction=Direction.OUT,
        local_addr=ANYCAST, remote_addr=CUSTOMER, udp_encap=False, local_port=0, remote_port=0,
        cipher=cipher, integ=integ, enc_key=os.urandom(CIPHER_KEY_BYTES[cipher]),
        salt=os.urandom(4) if cipher in AEAD_CIPHERS else b"",
        integ_key=os.urandom(INTEG_KEY_BYTES[integ]), replay_window=64,
        ts_local=ts, ts_remote=ts, child_id=1, generation=0, created=0, rekey_at=0, expire_at=0,
    )  # fmt: skip


def scapy_sa(rec: SaRecord) -> SecurityAssociation:
    aead = rec.cipher in AEAD_CIPHERS
    return SecurityAssociation(
        ESP, spi=rec.spi, crypt_algo=SCAPY_CRYPT[rec.cipher],
        crypt_key=rec.enc_key + rec.salt if aead else (rec.enc_key or None),
        auth_algo=SCAPY_AUTH[rec.integ], auth_key=rec.integ_key or None,
        tunnel_header=IP(src=ANYCAST, dst=CUSTOMER),
    )  # fmt: skip


def inner_packets() -> list[tuple[str, int, Packet]]:
    return [
        ("IPv4 ICMP echo", NEXT_HEADER_IPV4,
         IP(src="10.10.0.1", dst="192.168.1.10") / ICMP(id=1, seq=1) / b"hello from anywan"),
        ("IPv6 UDP", NEXT_HEADER_IPV6,
         IPv6(src="2001:db8:a::1", dst="2001:db8:b::2") / UDP(sport=4242, dport=53) / (b"x" * 200)),
    ]  # fmt: skip


def run() -> list[tuple[str, str, int, int, str, str]]:
    rows = []
    for index, (cipher, integ) in enumerate(TRANSFORMS):
        rec = record(cipher, integ, spi=0x1000 + index)
        ours_out = OutboundSa.from_record(rec, worker_id=7)
        ours_in = InboundSa.from_record(rec)
        theirs = scapy_sa(rec)
        name = cipher.value if integ is Integ.NONE else f"{cipher.value} + {integ.value}"
        for label, nh, inner in inner_packets():
            raw_inner = bytes(inner)
            esp = ours_out.encapsulate(raw_inner, nh)
            wire = IP(bytes(IP(src=ANYCAST, dst=CUSTOMER, proto=50) / esp))
            try:
                back = bytes(theirs.decrypt(wire))
                to_scapy = "ok" if back == raw_inner else "MISMATCH"
            except Exception as exc:  # scapy raises several types on a bad ICV
                to_scapy = f"FAILED ({type(exc).__name__})"
            seq = ours_out.seq
            from_scapy_wire = bytes(theirs.encrypt(inner, seq_num=seq)[ESP])
            try:
                got_nh, got = ours_in.decapsulate(from_scapy_wire)
                from_scapy = "ok" if (got_nh, bytes(got)) == (nh, raw_inner) else "MISMATCH"
            except Drop as drop:
                from_scapy = f"DROP {drop.reason.value}"
            rows.append((name, label, len(raw_inner), len(esp), to_scapy, from_scapy))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__)
    parser.parse_args(argv)
    print("anywan ESP demo: our encoder vs scapy's independent IPsec, tunnel mode")
    print(f"outer {ANYCAST} (anycast) <-> {CUSTOMER} (customer); keys are random and not shown\n")
    rows = run()
    header = ("transform", "inner packet", "inner B", "ESP B", "anywan→scapy", "scapy→anywan")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r).rstrip())
    print("\nUDP/4500 demultiplexing (RFC 3948):")
    esp_sample = OutboundSa.from_record(record(Cipher.AES128GCM16, Integ.NONE, 0x2000)).encapsulate(
        bytes(inner_packets()[0][2]), NEXT_HEADER_IPV4
    )
    samples = (
        ("ESP packet", esp_sample),
        ("IKE after non-ESP marker", NON_ESP_MARKER + bytes(28)),
        ("NAT keepalive 0xFF", b"\xff"),
    )
    for label, payload in samples:
        print(f"  {label:<26} -> {classify(payload).name}")
    ok = all(r[4] == "ok" and r[5] == "ok" for r in rows)
    print(f"\n{'all transforms interoperate' if ok else 'INTEROP FAILURES above'} "
          f"({len(rows)} packets each way)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
