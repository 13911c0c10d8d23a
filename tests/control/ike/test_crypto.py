"""Key derivation against NIST CAVP vectors; SK payload protection; PSK AUTH."""

from __future__ import annotations

import hmac as std_hmac
from pathlib import Path

import pytest

from control.ike import crypto
from control.ike.crypto import (
    ENCR_AES_CBC,
    ENCR_AES_GCM_16,
    INTEG_HMAC_SHA2_256_128,
    CryptoError,
    Prf,
    SkCipher,
)

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "ike" / "cavp_ikev2_kdf.txt"


def load_vector() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for line in VECTORS.read_text().splitlines():
        if line.startswith("#") or " = " not in line:
            continue
        k, _, v = line.partition(" = ")
        out[k.strip()] = (
            bytes.fromhex(v.strip())
            if k.strip() not in ("PRF", "DKM length")
            else (v.strip().encode())
        )
    return out


def test_cavp_ikev2_kdf_vector() -> None:
    """NIST CAVP SP 800-135 IKEv2 KDF: SKEYSEED, DKM, Child DKM with and without
    DH, and SKEYSEED for an IKE SA rekey (source URL in the vector file)."""
    v = load_vector()
    prf = Prf(int(v["PRF"]))
    n = int(v["DKM length"])
    seed = crypto.skeyseed(prf, v["Ni"], v["Nr"], v["g^ir"])
    assert seed == v["SKEYSEED"]
    dkm = prf.plus(seed, v["Ni"] + v["Nr"] + v["SPIi"] + v["SPIr"], n)
    assert dkm == v["DKM"]
    sk_d = dkm[: prf.size]
    assert prf.plus(sk_d, v["Ni"] + v["Nr"], n) == v["DKM(Child SA)"]
    assert prf.plus(sk_d, v["g^ir (new)"] + v["Ni"] + v["Nr"], n) == v["DKM(Child SA D-H)"]
    assert (
        crypto.rekey_skeyseed(prf, sk_d, v["g^ir (new)"], v["Ni"], v["Nr"]) == v["SKEYSEED(Rekey)"]
    )
    # derive_ike_keys splits the same DKM in §2.14 order
    keys = crypto.derive_ike_keys(
        prf, seed, v["Ni"], v["Nr"], v["SPIi"], v["SPIr"], enc_len=16, integ_len=20
    )
    assert keys.sk_d == sk_d and keys.sk_ai == dkm[20:40] and keys.sk_ei == dkm[60:76]
    assert keys.sk_pr == dkm[112:132]
    ck = crypto.child_keymat(prf, sk_d, v["Ni"], v["Nr"], enc_len=16, integ_len=20)
    child = v["DKM(Child SA)"]
    assert (ck.enc_i2r, ck.integ_i2r, ck.enc_r2i, ck.integ_r2i) == (
        child[:16],
        child[16:36],
        child[36:52],
        child[52:72],
    )
    assert "hidden" in repr(keys) and "hidden" in repr(ck)


@pytest.mark.parametrize("prf_id", [5, 6, 7])
def test_prf_plus_definition(prf_id: int) -> None:
    """§2.13 prf+ built independently with the stdlib's HMAC."""
    prf = Prf(prf_id)
    name = {5: "sha256", 6: "sha384", 7: "sha512"}[prf_id]
    key, seed = b"k" * prf.size, b"seed material"
    t, out = b"", b""
    for i in range(1, 5):
        t = std_hmac.digest(key, t + seed + bytes([i]), name)
        out += t
    assert prf.plus(key, seed, 3 * prf.size + 5) == out[: 3 * prf.size + 5]


def test_psk_auth_definition() -> None:
    """§2.15: prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    prf = Prf(5)
    inner = std_hmac.digest(b"secret", b"Key Pad for IKEv2", "sha256")
    assert crypto.psk_auth(prf, b"secret", b"octets") == std_hmac.digest(inner, b"octets", "sha256")


def _cipher(encr: int, bits: int) -> SkCipher:
    if encr == ENCR_AES_GCM_16:
        return SkCipher(encr, bytes(range(bits // 8 + 4)), None, b"")
    return SkCipher(encr, bytes(range(32)), INTEG_HMAC_SHA2_256_128, b"\x07" * 32)


@pytest.mark.parametrize(
    ("encr", "bits"), [(ENCR_AES_GCM_16, 128), (ENCR_AES_GCM_16, 256), (ENCR_AES_CBC, 256)]
)
@pytest.mark.parametrize("plain_len", [0, 1, 15, 16, 17, 300])
def test_sk_roundtrip_and_tamper(encr: int, bits: int, plain_len: int) -> None:
    c = _cipher(encr, bits)
    plain = bytes((i * 7) & 0xFF for i in range(plain_len))
    header = bytes(28)
    sk_len = 4 + c.overhead(plain_len)
    sk_header = bytes([0, 0]) + sk_len.to_bytes(2, "big")
    body = c.seal(header, sk_header, plain, bytes(c.iv_len))
    assert len(body) == sk_len - 4
    msg = header + sk_header + body
    assert c.open(msg, 28) == plain
    for pos in (0, 27, 29, 33, len(msg) - 1):  # header, SK header, IV, ICV
        bad = bytearray(msg)
        bad[pos] ^= 1
        with pytest.raises(CryptoError):
            c.open(bytes(bad), 28)
    with pytest.raises(CryptoError):
        c.open(msg[:40], 28)


def test_gcm_uses_salt_from_sk_e_and_aad() -> None:
    """RFC 5282: nonce = salt (last 4 octets of SK_e) ‖ 8-octet IV; AAD = IKE + SK headers."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(16))
    salt = b"\xaa\xbb\xcc\xdd"
    c = SkCipher(ENCR_AES_GCM_16, key + salt, None, b"")
    header, sk_header, iv = b"H" * 28, b"\x00\x00\x00\x2d", b"\x00" * 7 + b"\x01"
    body = c.seal(header, sk_header, b"hello", iv)
    assert body[:8] == iv
    plain = AESGCM(key).decrypt(salt + iv, body[8:], header + sk_header)
    assert plain == b"hello\x00"  # payloads ‖ pad length 0
