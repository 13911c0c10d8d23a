"""In-place AES-GCM (and the other in-place paths) of ``dataplane.esp``.

AES-GCM encapsulation encrypts in place: plaintext and ciphertext views of the
output buffer start at the same address (see ``_GcmOut``'s docstring for why
that is safe with cryptography 50 and OpenSSL). ``decapsulate(in_place=True)``
decrypts over the ciphertext. These tests pin what that relies on, so a
library upgrade that breaks it fails here:

* the library itself: in-place ``encrypt_into`` / ``decrypt_into`` give
  exactly the out-of-place result, for every length class;
* our codec: its packets equal an ESP packet built independently with
  out-of-place ``AESGCM.encrypt``, scapy decrypts them, and the two views
  handed to ``encrypt_into`` really do start at the same address (never a
  partial overlap, which cryptography 50 gets wrong);
* the view cache: many sizes, several buffers and offsets, nothing written
  outside the packet;
* in-place decapsulation equals the default path for every transform, also
  for AES-CBC's chained context, and leaves no unauthenticated plaintext.
"""

from __future__ import annotations

import ctypes
import os
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP
from scapy.layers.ipsec import ESP
from scapy.packet import Raw

from dataplane.drops import Drop, DropReason
from dataplane.esp import (
    MAX_SEQ,
    NEXT_HEADER_IPV4,
    NEXT_HEADER_IPV6,
    InboundSa,
    OutboundSa,
)
from replication.records import AEAD_CIPHERS, Cipher, Integ
from tests.dataplane.test_esp import TRANSFORM_IDS, TRANSFORMS, ipv4_packet, make_record
from tests.dataplane.test_esp_scapy import OUTER, scapy_sa

GCM = [(Cipher.AES128GCM16, Integ.NONE), (Cipher.AES256GCM16, Integ.NONE)]
GCM_IDS = ["aes128gcm16", "aes256gcm16"]
# Empty, sub-block, block edges, typical, MTU, jumbo.
SIZES = [0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 1398, 1400, 1500, 9000]


def address(view: memoryview) -> int:
    """Start address of a writable buffer (to prove exact aliasing)."""
    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view))


def expected_gcm_packet(
    key: bytes, salt: bytes, spi: int, seq: int, worker: int, inner: bytes, nh: int
) -> bytes:
    """RFC 4303/4106 ESP built with out-of-place ``AESGCM.encrypt``: the oracle."""
    hdr = struct.pack("!II", spi, seq)
    iv = struct.pack("!II", worker, seq)
    pad = -(len(inner) + 2) % 4
    plaintext = inner + bytes(range(1, pad + 1)) + bytes([pad, nh])
    return hdr + iv + AESGCM(key).encrypt(salt + iv, plaintext, hdr)


# ------------------------------------------------ the library's behaviour


@pytest.mark.parametrize("key_len", [16, 32])
def test_library_exact_in_place_encrypt_and_decrypt_equal_out_of_place(key_len: int) -> None:
    rng = random.Random(key_len)
    key = rng.randbytes(key_len)
    aead = AESGCM(key)
    for n in [*SIZES, *(rng.randrange(0, 3000) for _ in range(40))]:
        nonce, aad, plaintext = rng.randbytes(12), rng.randbytes(8), rng.randbytes(n)
        reference = aead.encrypt(nonce, plaintext, aad)
        buf = bytearray(plaintext + bytes(16))
        view = memoryview(buf)
        assert aead.encrypt_into(nonce, view[:n], aad, view) == n + 16
        assert bytes(buf) == reference, n
        assert aead.decrypt_into(nonce, view, aad, view[:n]) == n
        assert bytes(buf[:n]) == plaintext, n


# ------------------------------------------------------ our AES-GCM encap


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_packets_equal_the_out_of_place_oracle(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ)
    worker = 0x01ABCDEF
    sa = OutboundSa.from_record(rec, worker_id=worker)
    buf = bytearray(9300)
    rng = random.Random(7)
    for size in [*SIZES, *SIZES]:  # second lap: every view comes from the cache
        inner = rng.randbytes(size)
        for nh in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6):
            n = sa.encapsulate_into(buf, 0, inner, nh)
            want = expected_gcm_packet(rec.enc_key, rec.salt, rec.spi, sa.seq, worker, inner, nh)
            assert bytes(buf[:n]) == want, (size, nh)


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_encrypt_into_gets_exactly_aliased_views(cipher: Cipher, integ: Integ) -> None:
    """Plaintext and output start at the same address, output = plaintext + 16:
    exact in place, never the partial overlap cryptography 50 mishandles."""
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec)
    real = sa._encrypt_into  # type: ignore[attr-defined]
    seen: list[tuple[int, int, int, int]] = []
    nonces: list[tuple[int, bytes]] = []

    def spy(nonce: memoryview, data: memoryview, aad: memoryview, out: memoryview) -> int:
        seen.append((address(data), len(data), address(out), len(out)))
        nonces.append((address(nonce), bytes(nonce)))
        result: int = real(nonce, data, aad, out)
        return result

    sa._encrypt_into = spy  # type: ignore[attr-defined]
    buf = bytearray(4096)
    base = address(memoryview(buf))
    for offset, size in [(0, 1400), (0, 40), (20, 1400), (20, 3), (0, 1400)]:
        sa.encapsulate_into(buf, offset, bytes(size), NEXT_HEADER_IPV4)
        data_at, data_len, out_at, out_len = seen[-1]
        assert data_at == out_at == base + offset + 16
        assert out_len == data_len + 16
        # The nonce sits where the tag goes (and is overwritten by it).
        nonce_at, nonce = nonces[-1]
        assert nonce_at == out_at + data_len
        assert nonce == rec.salt + struct.pack("!II", 0, sa.seq)
        tag = bytes(buf[offset + 16 + data_len : offset + 32 + data_len])
        assert not tag.startswith(rec.salt)
    # The zero-copy variant too.
    sa.encapsulate_in_place(buf, 0, 100, NEXT_HEADER_IPV4)
    assert seen[-1][0] == seen[-1][2] == base + 16


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_failed_encrypt_leaves_no_salt_in_the_buffer(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec)

    def broken(nonce: memoryview, data: memoryview, aad: memoryview, out: memoryview) -> int:
        raise RuntimeError("simulated library failure")

    sa._encrypt_into = broken  # type: ignore[attr-defined]
    buf = bytearray(512)
    with pytest.raises(RuntimeError):
        sa.encapsulate_into(buf, 0, bytes(100), NEXT_HEADER_IPV4)
    assert rec.salt not in buf and sa.seq == 0


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_scapy_decrypts_in_place_gcm_across_buffers_offsets_and_sizes(
    cipher: Cipher, integ: Integ
) -> None:
    """More sizes than the view cache holds, two buffers, two offsets, and the
    bytes around each packet untouched (GCM needs no slack after the packet)."""
    rec = make_record(cipher, integ, spi=0x0A0B0C0D)
    ours = OutboundSa.from_record(rec, worker_id=3)
    theirs = scapy_sa(rec)
    buffers = [bytearray(b"\xee" * 2048), bytearray(b"\xee" * 2048)]
    rng = random.Random(11)
    for i in range(120):
        buf = buffers[i % 2]
        offset = (0, 34)[i // 7 % 2]
        inner = bytes(IP(src="10.1.1.1", dst="172.16.0.1") / Raw(rng.randbytes(rng.randrange(60))))
        n = ours.encapsulate_into(buf, offset, inner, NEXT_HEADER_IPV4)
        assert buf[:offset] == b"\xee" * offset
        assert buf[offset + n :] == b"\xee" * (2048 - offset - n)
        wire = IP(
            bytes(IP(src=OUTER.src, dst=OUTER.dst, proto=50) / Raw(bytes(buf[offset : offset + n])))
        )
        assert wire[ESP].seq == i + 1
        assert bytes(theirs.decrypt(wire)) == inner
        buf[offset : offset + n] = b"\xee" * n


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_in_place_back_to_back_in_one_buffer_like_a_gso_batch(
    cipher: Cipher, integ: Integ
) -> None:
    """The worker builds a UDP GSO batch in one buffer: datagram k in place at
    ``k * size``, more offsets than the SA remembers, sizes changing between
    batches. Every datagram equals the oracle and its neighbours are intact."""
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec, worker_id=5)
    hl = sa.payload_offset
    buf = bytearray(200_000)
    rng = random.Random(5)
    for batch, size in enumerate((1400, 1400, 52, 1400, 700)):
        inners = [rng.randbytes(size) for _ in range(70 if batch == 1 else 33)]
        total = sa.overhead(size) + size
        first_seq = sa.seq + 1
        for k, inner in enumerate(inners):
            buf[k * total + hl : k * total + hl + size] = inner
            assert sa.encapsulate_in_place(buf, k * total, size, NEXT_HEADER_IPV4) == total
        for k, inner in enumerate(inners):
            want = expected_gcm_packet(
                rec.enc_key, rec.salt, rec.spi, first_seq + k, 5, inner, NEXT_HEADER_IPV4
            )
            assert bytes(buf[k * total : (k + 1) * total]) == want, (batch, k)


def test_gcm_view_cache_stays_bounded_under_many_offsets_and_sizes() -> None:
    """Memory: whatever mix of offsets and lengths an SA sees, it keeps at
    most ``_VIEWS_MAX`` cut views, and every packet is still right."""
    from dataplane import esp

    rec = make_record(Cipher.AES256GCM16, Integ.NONE)
    sa = OutboundSa.from_record(rec, worker_id=2)
    hl = sa.payload_offset
    buf = bytearray(40_000)
    rng = random.Random(3)
    peak = 0
    for i in range(3000):
        size = rng.randrange(20, 200)
        at = rng.randrange(0, 40) * 300  # 40 offsets x up to 16 lengths > the bound
        inner = rng.randbytes(size)
        buf[at + hl : at + hl + size] = inner
        n = sa.encapsulate_in_place(buf, at, size, NEXT_HEADER_IPV4)
        if i % 97 == 0:
            want = expected_gcm_packet(rec.enc_key, rec.salt, rec.spi, sa.seq, 2, inner, 4)
            assert bytes(buf[at : at + n]) == want
        entries = sum(len(by_len) for by_len in sa._views.values())  # type: ignore[attr-defined]
        assert entries == sa._nviews <= esp._VIEWS_MAX  # type: ignore[attr-defined]
        peak = max(peak, entries)
    assert peak == esp._VIEWS_MAX  # the bound was reached, and held


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_encapsulate_in_place_equals_encapsulate_into(cipher: Cipher, integ: Integ) -> None:
    """Two SAs from one record (same worker id): the zero-copy call, with the
    inner packet already at ``payload_offset``, yields the same packets."""
    rec = make_record(cipher, integ)
    copying = OutboundSa.from_record(rec, worker_id=9)
    zero_copy = OutboundSa.from_record(rec, worker_id=9)
    inb = InboundSa.from_record(rec)
    a, b = bytearray(9200), bytearray(9200)
    hl = zero_copy.payload_offset
    assert hl == (16 if cipher in AEAD_CIPHERS else 8 if cipher is Cipher.NULL else 24)
    for size in (0, 1, 15, 64, 1400, 9000, 64):
        inner = ipv4_packet(os.urandom(max(0, size - 20)))[:size]
        n = copying.encapsulate_into(a, 10, inner, NEXT_HEADER_IPV6)
        b[10 + hl : 10 + hl + len(inner)] = inner
        m = zero_copy.encapsulate_in_place(b, 10, len(inner), NEXT_HEADER_IPV6)
        assert m == n and a[10 : 10 + n] == b[10 : 10 + n]
        assert inb.decapsulate(bytes(b[10 : 10 + n])) == (NEXT_HEADER_IPV6, memoryview(inner))
        # An exactly sized buffer (no slack after the ICV: AES-CBC falls back).
        exact = bytearray(n)
        exact[hl : hl + len(inner)] = inner
        assert copying.encapsulate_into(a, 10, inner, 4) == n
        assert zero_copy.encapsulate_in_place(exact, 0, len(inner), 4) == n
        assert exact == a[10 : 10 + n]


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_encapsulate_in_place_refusals_consume_nothing(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec, first_seq=MAX_SEQ)
    buf = bytearray(256)
    with pytest.raises(ValueError):
        sa.encapsulate_in_place(buf, 0, 300, NEXT_HEADER_IPV4)  # does not fit
    with pytest.raises(ValueError):
        sa.encapsulate_in_place(buf, 0, -1, NEXT_HEADER_IPV4)
    with pytest.raises(ValueError):
        sa.encapsulate_in_place(buf, 0, 10, 256)
    assert buf == bytes(256) and sa.seq == MAX_SEQ - 1
    assert sa.encapsulate_in_place(buf, 0, 10, NEXT_HEADER_IPV4) > 10
    snapshot = bytes(buf)
    with pytest.raises(Drop) as exc:
        sa.encapsulate_in_place(buf, 0, 10, NEXT_HEADER_IPV4)
    assert exc.value.reason is DropReason.SEQ_EXHAUSTED
    assert buf == snapshot and sa.seq == MAX_SEQ


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_refusals_after_caching_still_consume_nothing(cipher: Cipher, integ: Integ) -> None:
    """A cached length skips the length checks; bad next headers and an
    exhausted counter are still refused before anything is written."""
    sa = OutboundSa.from_record(make_record(cipher, integ), first_seq=MAX_SEQ - 1)
    buf = bytearray(512)
    sa.encapsulate_into(buf, 0, bytes(100), NEXT_HEADER_IPV4)  # caches length 100
    snapshot = bytes(buf)
    for nh in (256, -1, 1 << 20):
        with pytest.raises(ValueError):
            sa.encapsulate_into(buf, 0, bytes(100), nh)
    assert buf == snapshot and sa.seq == MAX_SEQ - 1
    sa.encapsulate_into(buf, 0, bytes(100), NEXT_HEADER_IPV4)
    snapshot = bytes(buf)
    with pytest.raises(Drop) as exc:
        sa.encapsulate_into(buf, 0, bytes(100), NEXT_HEADER_IPV4)
    assert exc.value.reason is DropReason.SEQ_EXHAUSTED
    assert buf == snapshot and sa.seq == MAX_SEQ


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_exhausted_counter_on_the_cached_in_place_path_writes_nothing(
    cipher: Cipher, integ: Integ
) -> None:
    """The last sequence numbers go out through the cached zero-copy path
    (views, trailer and counter all from the fast path); the packet after
    2**32-1 is the typed drop, with the buffer untouched, for a cached
    length and next header, the other cached next header, and a new length."""
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec, worker_id=7, first_seq=MAX_SEQ - 2)
    buf = bytearray(b"\xee" * 600)
    inner = ipv4_packet(b"x" * 80)
    hl = sa.payload_offset
    for nh in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, NEXT_HEADER_IPV4):  # last: all cached
        buf[10 + hl : 10 + hl + len(inner)] = inner
        seq = sa.seq + 1
        n = sa.encapsulate_in_place(buf, 10, len(inner), nh)
        assert bytes(buf[10 : 10 + n]) == expected_gcm_packet(
            rec.enc_key, rec.salt, rec.spi, seq, 7, inner, nh
        )
    assert sa.seq == MAX_SEQ and sa.remaining == 0
    snapshot = bytes(buf)
    for n_inner, nh in ((len(inner), NEXT_HEADER_IPV4), (len(inner), NEXT_HEADER_IPV6), (33, 4)):
        for _ in range(2):
            with pytest.raises(Drop) as exc:
                sa.encapsulate_in_place(buf, 10, n_inner, nh)
            assert exc.value.reason is DropReason.SEQ_EXHAUSTED
            with pytest.raises(Drop):
                sa.encapsulate_into(buf, 10, inner[:n_inner], nh)
    assert buf == snapshot and sa.seq == MAX_SEQ and sa.remaining == 0
    assert "seq=4294967295" in repr(sa)


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_first_seq_past_the_last_refuses_the_first_packet(cipher: Cipher, integ: Integ) -> None:
    """A new owner taking over at 2**32 (first_seq = MAX_SEQ + 1) must not send."""
    sa = OutboundSa.from_record(make_record(cipher, integ), first_seq=MAX_SEQ + 1)
    assert sa.seq == MAX_SEQ and sa.remaining == 0
    buf = bytearray(256)
    with pytest.raises(Drop) as exc:
        sa.encapsulate_in_place(buf, 0, 40, NEXT_HEADER_IPV4)
    assert exc.value.reason is DropReason.SEQ_EXHAUSTED
    assert buf == bytes(256)


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_failed_encrypt_gives_its_sequence_number_back(cipher: Cipher, integ: Integ) -> None:
    """A packet whose encrypt call raised was never sent: the next one takes
    its sequence number (and nonce), and the counter goes on from there."""
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec, worker_id=2)
    buf = bytearray(512)
    inner = ipv4_packet(b"y" * 60)
    hl = sa.payload_offset
    buf[hl : hl + len(inner)] = inner
    assert sa.encapsulate_in_place(buf, 0, len(inner), NEXT_HEADER_IPV4)  # seq 1, cached
    real = sa._encrypt_into  # type: ignore[attr-defined]

    def broken(nonce: memoryview, data: memoryview, aad: memoryview, out: memoryview) -> int:
        raise RuntimeError("simulated library failure")

    sa._encrypt_into = broken  # type: ignore[attr-defined]
    buf[hl : hl + len(inner)] = inner
    with pytest.raises(RuntimeError):
        sa.encapsulate_in_place(buf, 0, len(inner), NEXT_HEADER_IPV4)
    assert sa.seq == 1 and rec.salt not in buf
    sa._encrypt_into = real  # type: ignore[attr-defined]
    for seq in (2, 3):
        buf[hl : hl + len(inner)] = inner
        n = sa.encapsulate_in_place(buf, 0, len(inner), NEXT_HEADER_IPV4)
        assert bytes(buf[:n]) == expected_gcm_packet(
            rec.enc_key, rec.salt, rec.spi, seq, 2, inner, NEXT_HEADER_IPV4
        )


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_new_buffer_never_writes_through_the_old_buffers_views(
    cipher: Cipher, integ: Integ
) -> None:
    """Same offset and length in two buffers in turn: each packet lands in the
    buffer passed, the other buffer keeps every byte."""
    rec = make_record(cipher, integ)
    sa = OutboundSa.from_record(rec, worker_id=4)
    a, b = bytearray(b"\xaa" * 300), bytearray(b"\xbb" * 300)
    inner = ipv4_packet(b"z" * 100)
    hl = sa.payload_offset
    for buf, other in ((a, b), (b, a), (a, b), (a, b), (b, a)):
        buf[20 + hl : 20 + hl + len(inner)] = inner
        before = bytes(other)
        seq = sa.seq + 1
        n = sa.encapsulate_in_place(buf, 20, len(inner), NEXT_HEADER_IPV4)
        assert other == before
        assert bytes(buf[20 : 20 + n]) == expected_gcm_packet(
            rec.enc_key, rec.salt, rec.spi, seq, 4, inner, NEXT_HEADER_IPV4
        )


# ------------------------------------------------------- in-place decap


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_in_place_decapsulation_equals_the_default_path(cipher: Cipher, integ: Integ) -> None:
    """One inbound SA alternates in-place and copying decapsulation over a
    stream (AES-CBC's long-lived context must chain the same either way); a
    second SA checks every packet the default way."""
    rec = make_record(cipher, integ, replay_window=64)
    out = OutboundSa.from_record(rec, worker_id=2)
    mixed, plain = InboundSa.from_record(rec), InboundSa.from_record(rec)
    rng = random.Random(5)
    for i in range(60):
        inner = ipv4_packet(rng.randbytes(rng.randrange(0, 1480)))
        wire = out.encapsulate(inner, NEXT_HEADER_IPV4)
        assert plain.decapsulate(wire) == (NEXT_HEADER_IPV4, memoryview(inner))
        packet = bytearray(wire)
        nh, got = mixed.decapsulate(packet, in_place=bool(i % 2))
        assert (nh, bytes(got)) == (NEXT_HEADER_IPV4, inner)
        assert not got.readonly
        got[0] = got[0]  # writable, for the MSS clamp


@pytest.mark.parametrize(("cipher", "integ"), GCM, ids=GCM_IDS)
def test_gcm_in_place_decapsulation_uses_the_packet_buffer(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ)
    out, inb = OutboundSa.from_record(rec), InboundSa.from_record(rec)
    inner = ipv4_packet(b"x" * 1000)
    packet = bytearray(out.encapsulate(inner, NEXT_HEADER_IPV4))
    real = inb._decrypt_into  # type: ignore[attr-defined]
    seen: list[tuple[int, int]] = []

    def spy(nonce: bytes, data: memoryview, aad: memoryview, buf: memoryview) -> int:
        seen.append((address(data), address(buf)))
        result: int = real(nonce, data, aad, buf)
        return result

    inb._decrypt_into = spy  # type: ignore[attr-defined]
    _, got = inb.decapsulate(packet, in_place=True)
    assert seen[0][0] == seen[0][1] == address(memoryview(packet)) + 16
    assert bytes(got) == inner and packet[16 : 16 + len(inner)] == inner
    assert got.obj is packet or address(got) == address(memoryview(packet)) + 16


@pytest.mark.parametrize(("cipher", "integ"), TRANSFORMS, ids=TRANSFORM_IDS)
def test_in_place_bad_icv_leaves_no_plaintext(cipher: Cipher, integ: Integ) -> None:
    rec = make_record(cipher, integ)
    out, inb = OutboundSa.from_record(rec), InboundSa.from_record(rec)
    inner = ipv4_packet(b"secret payload " * 20)
    packet = bytearray(out.encapsulate(inner, NEXT_HEADER_IPV4))
    packet[-1] ^= 1
    with pytest.raises(Drop) as exc:
        inb.decapsulate(packet, in_place=True)
    assert exc.value.reason is DropReason.BAD_ICV
    assert b"secret payload" not in packet or cipher is Cipher.NULL  # NULL: never secret


def test_in_place_needs_a_writable_packet() -> None:
    rec = make_record(Cipher.AES128GCM16, Integ.NONE)
    wire = OutboundSa.from_record(rec).encapsulate(ipv4_packet(), NEXT_HEADER_IPV4)
    with pytest.raises(ValueError):
        InboundSa.from_record(rec).decapsulate(wire, in_place=True)
    # The same bytes through a writable buffer work.
    assert bytes(InboundSa.from_record(rec).decapsulate(bytearray(wire), in_place=True)[1]) == (
        ipv4_packet()
    )


@given(
    idx=st.integers(0, len(TRANSFORMS) - 1),
    inner=st.binary(min_size=0, max_size=200),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 40),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_in_place_mutated_packets_only_raise_drop(
    idx: int, inner: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    rec = make_record(*TRANSFORMS[idx], replay_window=64)
    original = OutboundSa.from_record(rec).encapsulate(inner, NEXT_HEADER_IPV4)
    packet = bytearray(original)
    for pos, xor in edits:
        packet[pos % len(packet)] ^= xor
    if cut:
        packet = packet[: max(0, len(packet) - cut)]
    assume(packet != original)
    with pytest.raises(Drop):
        InboundSa.from_record(rec).decapsulate(packet, in_place=True)
