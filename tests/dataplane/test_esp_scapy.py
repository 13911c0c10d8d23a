"""Interop with scapy's independent ESP (scapy.layers.ipsec), both ways,
every transform, IPv4 and IPv6 inner packets, tunnel mode.

scapy names: crypt_algo 'AES-GCM' (key ‖ 4-octet salt, RFC 4106 nonce =
salt ‖ 8-octet IV), 'AES-CBC', 'NULL'; auth_algo 'SHA2-256-128' (RFC 4868),
'HMAC-SHA1-96' (RFC 2404).
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet, Raw

from dataplane.drops import Drop, DropReason
from dataplane.esp import NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, InboundSa, OutboundSa
from replication.records import AEAD_CIPHERS, Cipher, Integ, SaRecord
from tests.dataplane.test_esp import TRANSFORM_IDS, TRANSFORMS, make_record

SCAPY_CRYPT = {
    Cipher.AES128GCM16: "AES-GCM",
    Cipher.AES256GCM16: "AES-GCM",
    Cipher.AES128CBC: "AES-CBC",
    Cipher.AES256CBC: "AES-CBC",
    Cipher.NULL: "NULL",
}
SCAPY_AUTH = {Integ.NONE: None, Integ.SHA256_128: "SHA2-256-128", Integ.SHA1_96: "HMAC-SHA1-96"}
OUTER = IP(src="198.51.100.2", dst="192.0.2.1")


def scapy_sa(rec: SaRecord) -> SecurityAssociation:
    aead = rec.cipher in AEAD_CIPHERS
    return SecurityAssociation(
        ESP,
        spi=rec.spi,
        crypt_algo=SCAPY_CRYPT[rec.cipher],
        crypt_key=rec.enc_key + rec.salt if aead else (rec.enc_key or None),
        auth_algo=SCAPY_AUTH[rec.integ],
        auth_key=rec.integ_key or None,
        tunnel_header=OUTER,
    )


def inner_packets() -> list[tuple[int, Packet]]:
    v4 = IP(src="10.1.1.1", dst="172.16.0.1")
    v6 = IPv6(src="2001:db8::1", dst="2001:db8:1::2")
    return [
        (NEXT_HEADER_IPV4, v4 / ICMP(id=7, seq=1) / b"ping"),
        (NEXT_HEADER_IPV4, v4 / UDP(sport=5, dport=53) / (b"q" * 1000)),
        (NEXT_HEADER_IPV6, v6 / UDP(sport=9, dport=9) / b"v6"),
        (NEXT_HEADER_IPV6, v6 / b"\x00"),
    ]


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_we_encrypt_scapy_decrypts(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ, spi=0x0A0B0C0D)
    ours = OutboundSa.from_record(rec, worker_id=5)
    theirs = scapy_sa(rec)
    for nh, inner in inner_packets():
        esp = ours.encapsulate(bytes(inner), nh)
        wire = IP(bytes(IP(src=OUTER.src, dst=OUTER.dst, proto=50) / Raw(esp)))
        assert wire[ESP].spi == 0x0A0B0C0D and wire[ESP].seq == ours.seq
        clear = theirs.decrypt(wire)  # verifies the ICV, then decrypts
        assert bytes(clear) == bytes(inner)


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_scapy_encrypts_we_decrypt(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ, spi=0x0A0B0C0D, replay_window=64)
    theirs = scapy_sa(rec)
    ours = InboundSa.from_record(rec)
    for seq, (nh, inner) in enumerate(inner_packets(), start=1):
        wire = theirs.encrypt(inner, seq_num=seq)
        assert wire[IP].proto == 50
        got_nh, got = ours.decapsulate(bytes(wire[ESP]))
        assert got_nh == nh
        assert bytes(got) == bytes(inner)


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_scapy_tampered_is_bad_icv(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ, spi=0x0A0B0C0D)
    wire = bytearray(bytes(scapy_sa(rec).encrypt(inner_packets()[0][1], seq_num=3)[ESP]))
    wire[-20] ^= 0x80
    with pytest.raises(Drop) as exc:
        InboundSa.from_record(rec).decapsulate(wire)
    assert exc.value.reason is DropReason.BAD_ICV
