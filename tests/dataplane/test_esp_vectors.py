"""Published known answers (tests/vectors/): our ESP framing and truncations
must reproduce them byte for byte."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from dataplane.drops import Drop, DropReason
from dataplane.esp import InboundSa, Integrity
from replication.records import Cipher, Integ
from tests.dataplane.test_esp import make_record

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


GCM = load("esp_gcm_mcgrew.json")
CBC = load("esp_cbc_rfc3602.json")
HMAC = load("hmac.json")


@pytest.mark.parametrize("case", GCM["cases"], ids=lambda c: c["name"])
def test_gcm_draft_mcgrew_packets_open(case: dict[str, str]) -> None:
    """draft-mcgrew-gcm-test-01: nonce = salt ‖ IV, AAD = SPI ‖ seq (RFC 4106)."""
    key, nonce, aad = (bytes.fromhex(case[k]) for k in ("key", "nonce", "aad"))
    ct, tag, pt = (bytes.fromhex(case[k]) for k in ("ciphertext", "tag", "plaintext"))
    spi, seq = int.from_bytes(aad[:4], "big"), int.from_bytes(aad[4:], "big")
    cipher = Cipher.AES128GCM16 if len(key) == 16 else Cipher.AES256GCM16
    rec = make_record(cipher, Integ.NONE, spi=spi, enc_key=key, salt=nonce[:4], replay_window=64)
    packet = aad + nonce[4:] + ct + tag
    inb = InboundSa.from_record(rec)
    nh, body = inb.open(packet)
    padlen = pt[-2]
    assert nh == pt[-1]
    assert bytes(body) == pt[: len(pt) - 2 - padlen]
    assert inb.replay is not None and inb.replay.top == seq
    # These are not tunnel-mode packets (next header 1 = ICMP…), so the tunnel
    # policy refuses them after ESP accepted them.
    with pytest.raises(Drop) as exc:
        InboundSa.from_record(rec).decapsulate(packet)
    assert exc.value.reason is DropReason.UNKNOWN_NEXT_HEADER
    # One changed tag bit: refused before anything else.
    forged = packet[:-1] + bytes([packet[-1] ^ 1])
    with pytest.raises(Drop) as exc:
        InboundSa.from_record(rec).open(forged)
    assert exc.value.reason is DropReason.BAD_ICV


@pytest.mark.parametrize("integ", [Integ.SHA256_128, Integ.SHA1_96])
@pytest.mark.parametrize("case", CBC["cases"], ids=lambda c: c["name"])
def test_cbc_rfc3602_packets_decrypt(case: dict[str, Any], integ: Integ) -> None:
    """RFC 3602 §4 Cases #5-#8 decrypt to the RFC's payloads. The RFC has no
    ICV, so the test appends one computed with hashlib (independent HMAC)."""
    key, packet = bytes.fromhex(case["key"]), bytes.fromhex(case["packet"])
    payload = bytes.fromhex(case["payload"])
    ikey = bytes(range(32 if integ is Integ.SHA256_128 else 20))
    digest, n = (hashlib.sha256, 16) if integ is Integ.SHA256_128 else (hashlib.sha1, 12)
    signed = packet + hmac.new(ikey, packet, digest).digest()[:n]
    rec = make_record(
        Cipher.AES128CBC, integ, spi=int.from_bytes(packet[:4], "big"), enc_key=key, integ_key=ikey
    )
    inb = InboundSa.from_record(rec)
    for _ in range(2):  # twice: the long-lived CBC context must not leak state
        if case["next_header"] == 4:
            nh, inner = inb.decapsulate(signed)
        else:
            nh, inner = inb.open(signed)
        assert nh == case["next_header"]
        assert bytes(inner) == payload


def _cases(kind: str) -> list[dict[str, str]]:
    return list(HMAC[kind]["cases"])


@pytest.mark.parametrize("case", _cases("sha256"), ids=lambda c: c["name"])
def test_hmac_sha256_128_truncation(case: dict[str, str]) -> None:
    mac = Integrity(Integ.SHA256_128, bytes.fromhex(case["key"]))
    assert mac.icv_len == 16
    assert mac.icv(bytes.fromhex(case["data"])) == bytes.fromhex(case["mac"])[:16]


@pytest.mark.parametrize("case", _cases("sha1"), ids=lambda c: c["name"])
def test_hmac_sha1_96_truncation(case: dict[str, str]) -> None:
    mac = Integrity(Integ.SHA1_96, bytes.fromhex(case["key"]))
    assert mac.icv_len == 12
    assert mac.icv(bytes.fromhex(case["data"])) == bytes.fromhex(case["mac"])[:12]


@pytest.mark.parametrize(
    "case",
    [c for c in _cases("sha256") if c["name"].startswith("RFC 4868") and len(c["data"]) >= 20],
    ids=lambda c: c["name"],
)
def test_rfc4868_vectors_as_null_esp_packets(case: dict[str, str]) -> None:
    """An RFC 4868 message read as a NULL-encrypted ESP packet (its first
    octets are SPI ‖ seq) followed by the RFC's 128-bit AUTH value passes our
    ICV check; its "trailer" is nonsense, so the verdict is BAD_PAD, not
    BAD_ICV. Changing one ICV bit gives BAD_ICV."""
    data, key = bytes.fromhex(case["data"]), bytes.fromhex(case["key"])
    auth = bytes.fromhex(case["mac"])[:16]
    rec = make_record(
        Cipher.NULL, Integ.SHA256_128, spi=int.from_bytes(data[:4], "big"), integ_key=key
    )
    with pytest.raises(Drop) as exc:
        InboundSa.from_record(rec).decapsulate(data + auth)
    assert exc.value.reason is DropReason.BAD_PAD
    with pytest.raises(Drop) as exc:
        InboundSa.from_record(rec).decapsulate(data + auth[:-1] + bytes([auth[-1] ^ 1]))
    assert exc.value.reason is DropReason.BAD_ICV
