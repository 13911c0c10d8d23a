"""Diffie-Hellman for IKEv2: ECP-384 (group 20) and MODP 2048/1536 (groups 14/5).

This is the ONE module that uses finite-field DH. ``cryptography`` 50 deprecates
FFDH (``CryptographyDeprecationWarning``); the warning is silenced only around
the calls here, and ``tests/control/test_dh.py`` fails loudly the day the API
disappears (pyproject bounds cryptography below 51).

Wire forms (the Key Exchange Data of RFC 7296 §3.4):

* MODP: g^x as a big-endian integer zero-padded to the modulus length
  (RFC 7296 §2.14 uses the same padding for the shared secret g^ir).
* ECP (RFC 5903 §7): x ‖ y, each coordinate padded to the field size, WITHOUT
  the 0x04 prefix of SEC1; the shared secret is the x coordinate alone.
"""

from __future__ import annotations

import warnings
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec
from cryptography.utils import CryptographyDeprecationWarning

ECP_384 = 20
MODP_2048 = 14
MODP_1536 = 5

# RFC 3526 §3 (2048-bit MODP group 14): 2^2048 - 2^1984 - 1 + 2^64 * { [2^1918 pi] + 124476 }
_MODP_2048_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718"
    "3995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
# RFC 3526 §2 (1536-bit MODP group 5): 2^1536 - 2^1472 - 1 + 2^64 * { [2^1406 pi] + 741804 }
_MODP_1536_P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74"
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437"
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05"
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA237327FFFFFFFFFFFFFFFF",
    16,
)
MODP_PRIMES: dict[int, int] = {MODP_2048: _MODP_2048_P, MODP_1536: _MODP_1536_P}
"""Group number → prime; the generator is 2 for both (RFC 3526)."""

KE_LENGTHS: dict[int, int] = {ECP_384: 96, MODP_2048: 256, MODP_1536: 192}
"""Length of the Key Exchange Data per group (RFC 5903 §7, RFC 3526)."""


class DhError(ValueError):
    """Peer's public value unusable (wrong length, off the curve, 0/1/p-1)."""


class KeyExchange(Protocol):
    group: int
    public: bytes
    """Our Key Exchange Data as it goes on the wire."""

    def shared(self, peer: bytes) -> bytes:
        """g^ir from the peer's Key Exchange Data; DhError if it is unusable."""
        ...

    def private_value(self) -> int:
        """The private exponent / scalar, for :func:`restore` (a restarted
        control finishing an exchange in flight; kept sealed like SK_d)."""
        ...


_PARAMS: dict[int, dh.DHParameters] = {}


def _params(group: int) -> dh.DHParameters:
    params = _PARAMS.get(group)
    if params is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            params = dh.DHParameterNumbers(MODP_PRIMES[group], 2).parameters()
        _PARAMS[group] = params
    return params


class ModpKeyExchange:
    """RFC 3526 MODP group through ``cryptography``'s (deprecated) FFDH."""

    __slots__ = ("_key", "group", "public")

    def __init__(self, group: int, private: tuple[int, bytes] | None = None) -> None:
        """``private``: (x, our public value) of a key to restore, else a new key."""
        self.group = group
        params = _params(group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if private is None:
                self._key = params.generate_private_key()
            else:
                x, public = private
                y = int.from_bytes(public, "big")
                pub = dh.DHPublicNumbers(y, params.parameter_numbers())
                self._key = dh.DHPrivateNumbers(x, pub).private_key()
            y = self._key.public_key().public_numbers().y
        self.public = y.to_bytes(KE_LENGTHS[group], "big")

    def private_value(self) -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return self._key.private_numbers().x

    def shared(self, peer: bytes) -> bytes:
        p = MODP_PRIMES[self.group]
        size = KE_LENGTHS[self.group]
        if len(peer) != size:
            raise DhError("MODP public value has the wrong length")
        y = int.from_bytes(peer, "big")
        # RFC 7296 §5 / SP 800-56A: reject 0, 1 and p-1 (small-subgroup values).
        if not 1 < y < p - 1:
            raise DhError("MODP public value out of range")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                numbers = dh.DHPublicNumbers(y, self._key.parameters().parameter_numbers())
                secret = self._key.exchange(numbers.public_key())
        except (ValueError, UnsupportedAlgorithm):
            raise DhError("MODP exchange failed") from None
        return secret.rjust(size, b"\x00")


class EcpKeyExchange:
    """RFC 5903 ECP-384 (secp384r1) through ``cryptography``'s ECDH."""

    __slots__ = ("_key", "group", "public")

    def __init__(self, group: int = ECP_384, private_value: int | None = None) -> None:
        if group != ECP_384:
            raise DhError(f"unsupported ECP group {group}")
        self.group = group
        curve = ec.SECP384R1()
        if private_value is None:
            self._key = ec.generate_private_key(curve)
        else:
            self._key = ec.derive_private_key(private_value, curve)
        point = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public = point[1:]  # RFC 5903 §7: no SEC1 0x04 prefix in IKE

    def private_value(self) -> int:
        return self._key.private_numbers().private_value

    def shared(self, peer: bytes) -> bytes:
        if len(peer) != KE_LENGTHS[ECP_384]:
            raise DhError("ECP public value has the wrong length")
        try:
            # from_encoded_point checks that the point is on the curve
            # (RFC 6989 §2.3: the recipient MUST validate the public value).
            pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), b"\x04" + peer)
            return self._key.exchange(ec.ECDH(), pub)
        except ValueError:
            raise DhError("ECP public value is not a point on the curve") from None


def generate(group: int) -> KeyExchange:
    """A fresh ephemeral key for ``group`` (one of 20, 14, 5)."""
    if group == ECP_384:
        return EcpKeyExchange()
    if group in MODP_PRIMES:
        return ModpKeyExchange(group)
    raise DhError(f"unsupported DH group {group}")


def restore(group: int, private_value: int, public: bytes) -> KeyExchange:
    """The key :meth:`KeyExchange.private_value` and ``public`` came from."""
    kex: KeyExchange
    if group == ECP_384:
        kex = EcpKeyExchange(group, private_value)
        check = kex.public  # derived from the scalar
    elif group in MODP_PRIMES:
        kex = ModpKeyExchange(group, (private_value, public))
        # OpenSSL takes y as given: check y = g^x (g = 2) with one exchange
        check = kex.shared((2).to_bytes(KE_LENGTHS[group], "big"))
    else:
        raise DhError(f"unsupported DH group {group}")
    if check != public:
        raise DhError("restored key does not match its public value")
    return kex


def ffdh_available() -> bool:
    """True while ``cryptography`` still offers finite-field DH."""
    try:
        _params(MODP_1536)
    except (AttributeError, UnsupportedAlgorithm):
        return False
    return True
