"""DH groups of control/ike/dh.py against published vectors and their definitions.

FFDH (MODP groups 5 and 14) is deprecated in cryptography 50: these tests fail
LOUDLY, not skip, the day it disappears, so nobody ships a responder that
silently lost two of the seeds' groups.
"""

from __future__ import annotations

import warnings

import pytest
from cryptography.utils import CryptographyDeprecationWarning

from control.ike import dh


def _pi_fixed(bits: int) -> int:
    """floor(pi * 2**bits) by Machin's formula, integers only."""
    guard = 64
    one = 1 << (bits + guard)

    def atan_inv(x: int) -> int:
        total = term = one // x
        n, sign = 1, -1
        while term:
            term //= x * x
            n += 2
            total += sign * (term // n)
            sign = -sign
        return total

    return (16 * atan_inv(5) - 4 * atan_inv(239)) >> guard


@pytest.mark.parametrize(("group", "bits", "const"), [(14, 2048, 124476), (5, 1536, 741804)])
def test_modp_prime_is_the_rfc3526_definition(group: int, bits: int, const: int) -> None:
    """RFC 3526 §2/§3 define p = 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130) pi] + c)."""
    p = 2**bits - 2 ** (bits - 64) - 1 + 2**64 * (_pi_fixed(bits - 130) + const)
    assert dh.MODP_PRIMES[group] == p
    assert pow(2, p - 1, p) == 1  # Fermat witness: prime (as published)


def test_ffdh_still_available_in_cryptography() -> None:
    """If this fails, cryptography removed FFDH: MODP 14/5 are gone. Do not skip it."""
    assert dh.ffdh_available(), "cryptography no longer provides finite-field DH (MODP 5/14)"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        kex = dh.generate(dh.MODP_2048)  # must not leak the deprecation warning
    assert len(kex.public) == 256


@pytest.mark.parametrize("group", [20, 14, 5])
def test_both_sides_agree_and_lengths(group: int) -> None:
    a, b = dh.generate(group), dh.generate(group)
    assert len(a.public) == dh.KE_LENGTHS[group]
    s = a.shared(b.public)
    assert s == b.shared(a.public)
    assert len(s) == (48 if group == 20 else dh.KE_LENGTHS[group])


# RFC 5903 §8.2 (384-bit Random ECP Group), https://www.rfc-editor.org/rfc/rfc5903#section-8.2
RFC5903_I = int(
    "099F3C7034D4A2C699884D73A375A67F7624EF7C6B3C0F160647B67414DCE655"
    "E35B538041E649EE3FAEF896783AB194",
    16,
)
RFC5903_GIX_GIY = bytes.fromhex(
    "667842D7D180AC2CDE6F74F37551F55755C7645C20EF73E31634FE72B4C55EE6"
    "DE3AC808ACB4BDB4C88732AEE95F41AA"
    "9482ED1FC0EEB9CAFC4984625CCFC23F65032149E0E144ADA024181535A0F38E"
    "EB9FCFF3C2C947DAE69B4C634573A81C"
)
RFC5903_R = int(
    "41CB0779B4BDB85D47846725FBEC3C9430FAB46CC8DC5060855CC9BDA0AA2942"
    "E0308312916B8ED2960E4BD55A7448FC",
    16,
)
RFC5903_GRX_GRY = bytes.fromhex(
    "E558DBEF53EECDE3D3FCCFC1AEA08A89A987475D12FD950D83CFA41732BC509D"
    "0D1AC43A0336DEF96FDA41D0774A3571"
    "DCFBEC7AACF3196472169E838430367F66EEBE3C6E70C416DD5F0C68759DD1FF"
    "F83FA40142209DFF5EAAD96DB9E6386C"
)
RFC5903_GIRX = bytes.fromhex(
    "11187331C279962D93D604243FD592CB9D0A926F422E47187521287E7156C5C4"
    "D603135569B9E9D09CF5D4A270F59746"
)


def test_ecp384_rfc5903_vector() -> None:
    """KE data is x‖y without 0x04 (RFC 5903 §7); the shared secret is x (§9)."""
    i = dh.EcpKeyExchange(private_value=RFC5903_I)
    r = dh.EcpKeyExchange(private_value=RFC5903_R)
    assert i.public == RFC5903_GIX_GIY
    assert r.public == RFC5903_GRX_GRY
    assert i.shared(RFC5903_GRX_GRY) == RFC5903_GIRX
    assert r.shared(RFC5903_GIX_GIY) == RFC5903_GIRX


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x00" * 96, RFC5903_GRX_GRY[:-1] + bytes([RFC5903_GRX_GRY[-1] ^ 1]), b"\x04" * 97],
)
def test_ecp384_rejects_bad_points(bad: bytes) -> None:
    with pytest.raises(dh.DhError):
        dh.generate(20).shared(bad)


@pytest.mark.parametrize("group", [14, 5])
def test_modp_rejects_degenerate_values(group: int) -> None:
    size, p = dh.KE_LENGTHS[group], dh.MODP_PRIMES[group]
    kex = dh.generate(group)
    for y in (0, 1, p - 1, p):
        with pytest.raises(dh.DhError):
            kex.shared(y.to_bytes(size, "big"))
    with pytest.raises(dh.DhError):
        kex.shared(b"\x02" * (size - 1))


def test_unknown_group() -> None:
    with pytest.raises(dh.DhError):
        dh.generate(19)


@pytest.mark.parametrize("group", [dh.ECP_384, dh.MODP_2048, dh.MODP_1536])
def test_a_key_restored_from_its_private_value_is_the_same_key(group: int) -> None:
    """A restarted control finishes a key exchange in flight with the key it
    kept (``KeyExchange.private_value``): same public value, same g^ir, and no
    deprecation warning escapes the module."""
    ours, peer = dh.generate(group), dh.generate(group)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = dh.restore(group, ours.private_value(), ours.public)
    assert again.public == ours.public
    assert again.shared(peer.public) == ours.shared(peer.public) == peer.shared(ours.public)
    with pytest.raises(dh.DhError):
        dh.restore(group, ours.private_value() + 1, ours.public)  # not its public value
