"""IKEv2 key derivation, PSK authentication and the SK payload's protection.

* prf / prf+ — RFC 7296 §2.13 (https://www.rfc-editor.org/rfc/rfc7296#section-2.13)
* SKEYSEED and SK_d/ai/ar/ei/er/pi/pr — §2.14; IKE SA rekey — §2.18
* Child SA KEYMAT, with and without PFS — §2.17; AES-GCM salt — RFC 4106 §8.1
* PSK AUTH — §2.15
* SK payload (§3.14) with AES-CBC + HMAC-SHA2-256-128 (RFC 3602, RFC 4868) and
  AES-GCM-16 (RFC 5282: 4-octet salt from SK_e, 8-octet IV, AAD = IKE header
  and SK payload header).

Everything goes through ``cryptography`` (HMAC, AES). Unlike the ESP hot path,
the AEAD object is made per IKE message: an IKE SA sends a few messages a
minute, and a cached ``AESGCM`` costs about 2.6 KB of OpenSSL memory per
direction, which at 10 000 IKE SAs matters more than the microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from hmac import compare_digest

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# IANA "Transform Type 2 - Pseudorandom Function Transform IDs"
PRF_HMAC_SHA1 = 2
PRF_HMAC_SHA2_256 = 5
PRF_HMAC_SHA2_384 = 6
PRF_HMAC_SHA2_512 = 7

_PRF_HASH: dict[int, type[hashes.HashAlgorithm]] = {
    PRF_HMAC_SHA1: hashes.SHA1,
    PRF_HMAC_SHA2_256: hashes.SHA256,
    PRF_HMAC_SHA2_384: hashes.SHA384,
    PRF_HMAC_SHA2_512: hashes.SHA512,
}

KEY_PAD = b"Key Pad for IKEv2"
"""RFC 7296 §2.15: 17 ASCII characters, no NUL."""


class CryptoError(ValueError):
    """Integrity check failed or the ciphertext is malformed."""


class Prf:
    """HMAC-based prf of RFC 7296 §2.13 (key length = output length, §3.3.5)."""

    __slots__ = ("_hash", "size", "transform_id")

    def __init__(self, transform_id: int) -> None:
        self.transform_id = transform_id
        self._hash = _PRF_HASH[transform_id]
        self.size: int = self._hash().digest_size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        h = hmac.HMAC(key, self._hash())
        h.update(data)
        return h.finalize()

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (§2.13): T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n)."""
        if length > 255 * self.size:
            raise ValueError("prf+ cannot produce that much keying material")
        out = bytearray()
        t = b""
        n = 1
        while len(out) < length:
            t = self(key, t + seed + bytes([n]))
            out += t
            n += 1
        return bytes(out[:length])


@dataclass(frozen=True, slots=True)
class IkeKeys:
    """The seven SK_* of §2.14 (SK_e includes the 4-octet salt for GCM)."""

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    def __repr__(self) -> str:
        return "IkeKeys(<hidden>)"


def skeyseed(prf: Prf, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """§2.14: SKEYSEED = prf(Ni | Nr, g^ir)."""
    return prf(ni + nr, g_ir)


def rekey_skeyseed(old_prf: Prf, old_sk_d: bytes, g_ir: bytes, ni: bytes, nr: bytes) -> bytes:
    """§2.18: SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr), with the OLD SA's prf."""
    return old_prf(old_sk_d, g_ir + ni + nr)


def derive_ike_keys(
    prf: Prf,
    seed: bytes,
    ni: bytes,
    nr: bytes,
    spi_i: bytes,
    spi_r: bytes,
    *,
    enc_len: int,
    integ_len: int,
) -> IkeKeys:
    """§2.14: {SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr). ``enc_len`` includes a GCM salt."""
    n = prf.size
    total = 3 * n + 2 * integ_len + 2 * enc_len
    km = prf.plus(seed, ni + nr + spi_i + spi_r, total)
    parts = []
    off = 0
    for size in (n, integ_len, integ_len, enc_len, enc_len, n, n):
        parts.append(km[off : off + size])
        off += size
    return IkeKeys(*parts)


@dataclass(frozen=True, slots=True)
class ChildKeys:
    """§2.17 KEYMAT split: initiator→responder first, then responder→initiator.

    For AES-GCM each ``enc`` is key ‖ 4-octet salt (RFC 4106 §8.1)."""

    enc_i2r: bytes
    integ_i2r: bytes
    enc_r2i: bytes
    integ_r2i: bytes

    def __repr__(self) -> str:
        return "ChildKeys(<hidden>)"


def child_keymat(
    prf: Prf,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    *,
    enc_len: int,
    integ_len: int,
    g_ir: bytes | None = None,
) -> ChildKeys:
    """§2.17: KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr); encryption key then
    integrity key for each direction, i→r first (§2.17 last paragraphs)."""
    seed = (g_ir or b"") + ni + nr
    km = prf.plus(sk_d, seed, 2 * (enc_len + integ_len))
    a = enc_len
    b = a + integ_len
    c = b + enc_len
    return ChildKeys(km[:a], km[a:b], km[b:c], km[c : c + integ_len])


def psk_auth(prf: Prf, psk: bytes, signed_octets: bytes) -> bytes:
    """§2.15: AUTH = prf( prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>)."""
    return prf(prf(psk, KEY_PAD), signed_octets)


def signed_octets(
    prf: Prf, real_message: bytes, peer_nonce: bytes, sk_p: bytes, id_body: bytes
) -> bytes:
    """§2.15: RealMessage | NonceData of the other side | prf(SK_p, ID'),
    where ID' is the ID payload without its generic header."""
    return real_message + peer_nonce + prf(sk_p, id_body)


# ---------------------------------------------------------------- SK payload

ENCR_AES_CBC = 12
ENCR_AES_GCM_16 = 20
ENCR_NULL = 11
INTEG_HMAC_SHA1_96 = 2
INTEG_HMAC_SHA2_256_128 = 12


class SkCipher:
    """One direction's protection of the Encrypted payload (§3.14).

    ``seal`` takes the 28-octet IKE header and the SK payload's 4-octet generic
    header (both with final lengths already) and the inner payloads; ``open``
    takes the whole message and the SK payload's offset and returns the inner
    payloads. Integrity is checked before anything is decrypted.
    """

    __slots__ = ("_enc_key", "_integ_key", "_salt", "gcm", "icv_len", "iv_len")

    def __init__(self, encr: int, enc_key: bytes, integ: int | None, integ_key: bytes) -> None:
        if encr == ENCR_AES_GCM_16:
            # RFC 5282 §7.1: the last 4 octets of SK_e are the salt.
            self.gcm = True
            self._enc_key = enc_key[:-4]
            self._salt = enc_key[-4:]
            self.iv_len = 8
            self.icv_len = 16
            self._integ_key = b""
        elif encr == ENCR_AES_CBC and integ == INTEG_HMAC_SHA2_256_128:
            self.gcm = False
            self._enc_key = enc_key
            self._salt = b""
            self.iv_len = 16
            self.icv_len = 16
            self._integ_key = integ_key
        else:
            raise ValueError(f"unsupported SK transform encr={encr} integ={integ}")

    def overhead(self, plain_len: int) -> int:
        """Octets the SK payload body takes for ``plain_len`` octets of payloads."""
        return self.iv_len + self._padded(plain_len) + self.icv_len

    def _padded(self, plain_len: int) -> int:
        if self.gcm:
            return plain_len + 1  # pad length octet only (RFC 5282 §3: no alignment)
        return (plain_len + 1 + 15) // 16 * 16

    def seal(self, header: bytes, sk_header: bytes, plain: bytes, iv: bytes) -> bytes:
        """Returns IV ‖ ciphertext ‖ ICV: the SK payload's body."""
        pad = self._padded(len(plain)) - len(plain) - 1
        data = plain + bytes(pad) + bytes([pad])
        if self.gcm:
            ct = AESGCM(self._enc_key).encrypt(self._salt + iv, data, header + sk_header)
            return iv + ct
        enc = Cipher(algorithms.AES(self._enc_key), modes.CBC(iv)).encryptor()
        ct = enc.update(data) + enc.finalize()
        h = hmac.HMAC(self._integ_key, hashes.SHA256())
        h.update(header + sk_header + iv + ct)
        return iv + ct + h.finalize()[:16]

    def open(self, message: bytes, sk_offset: int) -> bytes:
        """The inner payloads of the SK payload at ``sk_offset`` (its generic header).

        The SK payload must be the last one (§3.14) and run to the message end."""
        body = sk_offset + 4
        if len(message) - body < self.iv_len + self.icv_len + (1 if self.gcm else 16):
            raise CryptoError("SK payload too short")
        iv = message[body : body + self.iv_len]
        if self.gcm:
            try:
                data = AESGCM(self._enc_key).decrypt(
                    self._salt + iv, message[body + self.iv_len :], message[:body]
                )
            except InvalidTag:
                raise CryptoError("SK ICV mismatch") from None
        else:
            ct_end = len(message) - self.icv_len
            ct = message[body + self.iv_len : ct_end]
            if len(ct) % 16:
                raise CryptoError("SK ciphertext not a multiple of the block size")
            h = hmac.HMAC(self._integ_key, hashes.SHA256())
            h.update(message[:ct_end])
            if not compare_digest(h.finalize()[:16], message[ct_end:]):
                raise CryptoError("SK ICV mismatch")
            dec = Cipher(algorithms.AES(self._enc_key), modes.CBC(iv)).decryptor()
            data = dec.update(ct) + dec.finalize()
        pad = data[-1]
        if pad + 1 > len(data):
            raise CryptoError("SK pad length exceeds the payload")
        return data[: len(data) - pad - 1]
