"""ESP in tunnel mode, RFC 4303, for the Child SA transforms of DESIGN §3.

https://www.rfc-editor.org/rfc/rfc4303#section-2

Wire format (RFC 4303 §2, Figure 2, with the IV of the cipher in front of the
payload)::

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
    |               Security Parameters Index (SPI)                 |  ^ ICV
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  | (AAD
    |                      Sequence Number                          |  | for GCM)
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  | ---
    |       IV (8 octets GCM, 16 octets CBC, none for NULL)          |  |  ^
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  |  | encrypted
    |          Payload: the inner IPv4 / IPv6 packet                 |  |  |
    +               +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  |  |
    |               |     Padding 1, 2, 3, ... (0-255 octets)        |  |  |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+  |  |
    |                               |  Pad Length   | Next Header   |  v  v
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+ ---
    |         ICV (16 octets GCM / SHA2-256-128, 12 for SHA1-96)     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Transforms (``replication.records.Cipher`` × ``Integ``):

* AES-GCM-16, 128/256-bit keys, RFC 4106: nonce = 4-octet salt ‖ 8-octet
  explicit IV, AAD = SPI ‖ sequence number (32-bit; §5), 16-octet ICV.
* AES-CBC-128/256, RFC 3602, with HMAC-SHA2-256-128 (RFC 4868) or
  HMAC-SHA1-96 (RFC 2404). Encrypt-then-MAC; the ICV is checked before
  anything is decrypted.
* NULL encryption, RFC 2410, with either HMAC; only for tunnels that opt in.

ESN is not supported: SaRecord has no ESN option (the seeds forbid it), every
sequence number here is the 32-bit field on the wire, and the AAD / ICV input
is exactly SPI ‖ seq (RFC 4303 §2.2.1 without the high-order 32 bits).

**GCM IV uniqueness across workers** (DESIGN §5, RFC 4106 §3.1). Every worker
encrypts with the same key, so the explicit IV is
``worker_id (32 bits) ‖ sequence number (32 bits)`` where the sequence number
is this worker's own counter for the SA. Two workers with different ids can
never produce the same IV; one worker never repeats a sequence number. The
bound: each worker sends at most 2**32 - 1 packets per SA (sequence numbers
1 .. 2**32-1, RFC 4303 §3.3.3: without ESN the counter MUST NOT cycle). The
next packet raises ``Drop(SEQ_EXHAUSTED)``, never a wrap; control rekeys
long before that (4 h lifetime). Operational requirement: ``worker_id`` must
be unique among all processes that ever hold the SA's key during its lifetime
- a restarted worker must come back with a fresh id, never reuse one with a
fresh counter (that would repeat GCM nonces). :func:`iv_worker_id` composes
one from the worker's index and an incarnation number. With anti-replay on, one owner sends on
the SA and a new owner resumes with ``first_seq`` = checkpoint + safety jump
under its own worker id, so its IVs are fresh too.

**CBC IVs** must be unpredictable (RFC 3602 §2.1), not merely unique. We do not
call ``os.urandom`` per packet (sans-IO, and slow). Each OutboundSa keeps one
long-lived AES-CBC encryption context and feeds it, in front of every
packet's plaintext, one *counter block* (worker id ‖ sequence number ‖ zeros).
The first output block is therefore ``AES_K(counter ⊕ C_prev)`` where
``C_prev`` is the last ciphertext block this context produced: it is used as
the packet's IV, and the rest of the output is exactly CBC under that IV.
This is NIST SP 800-38A Appendix C's first method (IV = CIPH_K(nonce), same
key as the data) with a nonce that includes a per-packet counter; without the
key nobody can predict it (unlike TLS 1.0's "last block is the next IV",
the counter block is ours, not the attacker's). It also saves building a
cipher context per packet. Decryption uses the same trick backwards: the
long-lived CBC decryption context is fed IV ‖ ciphertext and the first output
block is discarded, so its chaining state is the packet's IV when the data
starts.

**Zero-copy paths.** AES-GCM always encrypts in place in the output buffer
(``_GcmOut``). ``OutboundSa.encapsulate_in_place`` takes an inner packet that
already sits at ``payload_offset`` in the output buffer (read there from the
TUN: no copy at all), and ``InboundSa.decapsulate(packet, in_place=True)``
decrypts over the ciphertext in the receive buffer (no allocation).

Per-SA state and buffers are not thread-safe: the design runs one worker
process per core with one thread on the packet path (DESIGN §7).
"""

from __future__ import annotations

import hmac
import operator
import struct
from collections.abc import Callable, Iterator
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.ciphers import Cipher as _Cipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dataplane.drops import Drop, DropReason
from dataplane.replay import ReplayWindow
from replication.records import Cipher, Integ, SaRecord

NEXT_HEADER_IPV4: Final = 4
NEXT_HEADER_IPV6: Final = 41
NEXT_HEADER_NONE: Final = 59
"""RFC 4303 §2.6: a dummy packet for traffic-flow confidentiality; dropped."""

MAX_SEQ: Final = 0xFFFFFFFF
"""Last sequence number a worker may send on one SA (no ESN, no wrap)."""
MAX_WORKER_ID: Final = 0xFFFFFFFF
"""Worker ids occupy the high 32 bits of the GCM explicit IV."""
MAX_INNER: Final = 0xFFFF
"""Largest inner packet accepted by encapsulate_into (an IP datagram)."""

ESP_HEADER_LEN: Final = 8
_HDR = struct.Struct("!II")
"""SPI, sequence number (RFC 4303 §2.1, §2.2)."""
_CTR = struct.Struct("!IIQ")
"""CBC counter block: worker id, sequence number, zero."""
_HDR_IV = struct.Struct("!4sI4sI")
"""SPI, sequence number and the GCM explicit IV (worker id, sequence number)
in one write; SPI and worker id as the SA's constant 4-octet strings (a
copy, cheaper per packet than converting the two integers)."""
_HDR_IV_PACK = _HDR_IV.pack_into
_HDR_UNPACK = _HDR.unpack_from
_PAD = bytes(range(1, 256))
"""RFC 4303 §2.4: default padding is 1, 2, 3, ... ."""
_PADS = tuple(_PAD[:i] for i in range(256))
"""The expected padding for each pad length."""
_TRAILER_NONCE_PACK = tuple(struct.Struct(f"!{pad + 10}sI").pack_into for pad in range(4))
"""AES-GCM: trailer (padding ‖ pad length ‖ next header) followed by the
nonce (salt ‖ worker id ‖ seq) in one write, by pad length: the first field
is the trailer joined with the SA's constant salt ‖ worker id (one argument
instead of three); see _GcmOut."""
_TRAILERS = tuple(tuple(_PAD[:pad] + bytes((pad, nh)) for nh in range(256)) for pad in range(16))
"""Padding ‖ pad length ‖ next header for pad 0..15 and every next header:
one table lookup and one slice assignment per packet."""

_SCRATCH = 9216
"""Initial per-SA plaintext scratch buffer for AES-CBC (octets)."""
_VIEW_CACHE = 16
"""Most inner-packet lengths an AES-GCM SA keeps cut views for (per output
buffer and offset); traffic is dominated by a few sizes (full MSS segments,
bare ACKs). When full the cache is emptied, never grown: about 1 KiB per
length, so about 16 KiB per SA and offset in use."""
_BINDINGS = 64
"""Most offsets of one output buffer an AES-GCM SA keeps views for: at least
the worker's UDP GSO batch (32 datagrams), so a steady stream of one size
reuses them (a few views per offset and length in use)."""
_VIEWS_MAX = 256
"""Most (offset, length) entries an AES-GCM SA keeps in all (about 1 KiB
each): the bound on its memory, whatever mix of sizes and offsets it sees.
When reached, every entry is dropped and cut again on use."""
_EMPTY = memoryview(b"")
_GCM_IV = 8
_GCM_ICV = 16
_GCM_FIXED = ESP_HEADER_LEN + _GCM_IV + _GCM_ICV
"""Octets an AES-GCM ESP packet adds around its plaintext (32)."""
_GCM_MIN = _GCM_FIXED + 2
"""Shortest AES-GCM ESP packet: an empty payload with its 2-octet trailer."""
_CBC_BLOCK = 16
_ICV_LEN = {Integ.SHA256_128: 16, Integ.SHA1_96: 12, Integ.NONE: 0}
_HASH: dict[Integ, type[hashes.HashAlgorithm]] = {
    Integ.SHA256_128: hashes.SHA256,
    Integ.SHA1_96: hashes.SHA1,
}
_GCM = frozenset({Cipher.AES128GCM16, Cipher.AES256GCM16})
_CBC = frozenset({Cipher.AES128CBC, Cipher.AES256CBC})

Buffer = bytes | bytearray | memoryview
_GcmViews = tuple[
    memoryview,
    memoryview,
    memoryview,
    Callable[..., None],
    int,
    int,
    bytes,
    dict[int, bytes],
    int,
    memoryview,
    bytes,
    bytes,
]
"""(plaintext, ciphertext ‖ tag, nonce) views into ``out``, the trailer ‖
nonce writer for the pad length, where it writes, the next header seen
last for this entry and its trailer ‖ salt ‖ worker id, the same by next
header for the pad length (filled on first use), the ESP packet length, the
AAD view (SPI ‖ seq in the header), and the SPI and worker id as 4 octets."""


def iv_worker_id(index: int, incarnation: int) -> int:
    """The 32-bit ``worker_id`` for GCM IVs: 8-bit worker index ‖ 24-bit
    incarnation (index < 256, incarnation taken modulo 2**24).

    The incarnation must differ between two processes that use the same index
    while one SA key is alive (4 h by default). A counter handed out by control
    is best; the wall clock in tenths of a second (wraps after 19 days, so two
    starts of one index more than 0.1 s apart never collide within an SA's
    lifetime, unless the clock steps back) is a workable stand-in.
    """
    if not 0 <= index <= 0xFF:
        raise ValueError("worker index must be in 0..255")
    return (index << 24) | (incarnation & 0xFFFFFF)


def peek_spi(packet: Buffer) -> int:
    """The SPI of an ESP packet, to find its SA; ``Drop(MALFORMED)`` if the
    packet is shorter than the 8-octet ESP header."""
    if len(packet) < ESP_HEADER_LEN:
        raise Drop(DropReason.MALFORMED, "shorter than an ESP header")
    spi: int = _HDR.unpack_from(packet, 0)[0]
    return spi


class Integrity:
    """Truncated HMAC for ESP (RFC 2404: SHA1-96, RFC 4868: SHA2-256-128).

    The keyed HMAC context is built once; each packet works on a ``copy()``,
    which skips re-hashing the padded key. The key never appears in a repr.
    """

    __slots__ = ("_mac", "icv_len")

    def __init__(self, integ: Integ, key: bytes) -> None:
        if integ not in _HASH:
            raise ValueError("not an HMAC integrity transform")
        self._mac = chmac.HMAC(key, _HASH[integ]())
        self.icv_len = _ICV_LEN[integ]
        """Octets of the HMAC output kept as the ICV."""

    def icv(self, data: Buffer) -> bytes:
        """The first ``icv_len`` octets of HMAC(key, data)."""
        mac = self._mac.copy()
        mac.update(data)
        return mac.finalize()[: self.icv_len]

    def __repr__(self) -> str:
        return f"Integrity(icv_len={self.icv_len})"


def _geometry(cipher: Cipher, integ: Integ) -> tuple[int, int, int]:
    """(IV length, alignment of the encrypted part, ICV length)."""
    if cipher in _GCM:
        # RFC 4106 §3.2: GCM needs no block padding, ESP's 4-octet alignment stays.
        return _GCM_IV, 4, _GCM_ICV
    if cipher in _CBC:
        return _CBC_BLOCK, _CBC_BLOCK, _ICV_LEN[integ]
    # RFC 2410 §2: NULL has a block size of 1, no IV; RFC 4303 §2.4 alignment of 4.
    return 0, 4, _ICV_LEN[integ]


def _check_integ(rec: SaRecord) -> None:
    cipher = Cipher(rec.cipher)
    if cipher in _GCM:
        if rec.integ is not Integ.NONE:
            raise ValueError("AES-GCM takes no separate integrity transform")
    elif rec.integ is Integ.NONE:
        # RFC 4303 §3.2: NULL encryption without integrity is not allowed,
        # and CBC without integrity is not in our scope.
        raise ValueError("this cipher needs an integrity transform")


class OutboundSa:
    """One outbound SA on one worker: encrypts inner packets into ESP.

    Built once per SA when its record lands (DESIGN §7); holds the cipher
    context, the keyed HMAC and (AES-CBC) a plaintext scratch buffer or
    (AES-GCM) views into the caller's output buffer. See the module
    docstring for the IV and sequence-number bounds. Constructing
    ``OutboundSa(rec)`` returns the subclass for the record's cipher (AES-GCM,
    AES-CBC or NULL), each with a straight-line ``encapsulate_into``.
    """

    __slots__ = (
        "_align",
        "_fixed",
        "_iv_len",
        "_out_view",
        "_scratch_view",
        "cipher",
        "icv_len",
        "integ",
        "seq",
        "spi",
        "worker_id",
    )

    def __new__(cls, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> OutboundSa:
        if cls is OutboundSa:
            cipher = Cipher(rec.cipher)
            cls = _GcmOut if cipher in _GCM else _CbcOut if cipher in _CBC else _NullOut
        return object.__new__(cls)

    def __init__(self, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> None:
        if not 0 <= worker_id <= MAX_WORKER_ID:
            raise ValueError(f"worker_id must be in 0..{MAX_WORKER_ID}")
        if not 1 <= first_seq <= MAX_SEQ + 1:
            raise ValueError("first_seq must be in 1..2**32")
        _check_integ(rec)
        self.spi: int = rec.spi
        self.cipher: Cipher = Cipher(rec.cipher)
        self.integ: Integ = Integ(rec.integ)
        self.worker_id: int = worker_id
        self.seq: int = first_seq - 1
        """Last sequence number sent by this worker (0 before the first)."""
        self._iv_len, self._align, self.icv_len = _geometry(self.cipher, self.integ)
        self._fixed = ESP_HEADER_LEN + self._iv_len + self.icv_len
        self._out_view = _EMPTY
        self._scratch_view = _EMPTY

    @classmethod
    def from_record(cls, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> OutboundSa:
        """Build the SA's cipher state once; ``worker_id`` goes into every IV."""
        return OutboundSa(rec, worker_id=worker_id, first_seq=first_seq)

    @property
    def payload_offset(self) -> int:
        """Octets between ``offset`` and the inner packet in an ESP packet
        (header and IV: 16 for AES-GCM, 24 for AES-CBC, 8 for NULL): where
        :meth:`encapsulate_in_place` expects the inner packet."""
        return ESP_HEADER_LEN + self._iv_len

    def overhead(self, inner_len: int) -> int:
        """Octets ESP adds to an inner packet of ``inner_len`` octets:
        header, IV, padding, pad length, next header and ICV."""
        pad = -(inner_len + 2) % self._align
        return ESP_HEADER_LEN + self._iv_len + pad + 2 + self.icv_len

    @property
    def remaining(self) -> int:
        """Packets this worker may still send before ``SEQ_EXHAUSTED``."""
        return MAX_SEQ - self.seq

    def encapsulate_into(self, out: bytearray, offset: int, inner: Buffer, next_header: int) -> int:
        """Write SPI ‖ seq ‖ IV ‖ encrypted(inner ‖ pad ‖ trailer) ‖ ICV at
        ``out[offset:]`` and return its length.

        ``Drop(SEQ_EXHAUSTED)`` once this worker sent 2**32-1 packets on the SA.
        ``ValueError`` for caller bugs (buffer too small, inner > 65535 octets,
        next header outside 0..255); nothing is consumed then. AES-CBC may use
        up to 15 octets after the packet in ``out`` as scratch space. The SA
        keeps memoryviews of the last ``out`` it saw (a worker reuses one
        buffer), so that bytearray cannot be resized while the SA lives.
        ``inner`` must not overlap ``out[offset:offset + length]``; use
        :meth:`encapsulate_in_place` for an inner packet already in ``out``.
        """
        raise NotImplementedError  # each cipher's subclass implements it

    def encapsulate_in_place(self, out: bytearray, offset: int, n: int, next_header: int) -> int:
        """Like :meth:`encapsulate_into` for an ``n``-octet inner packet that
        already sits at ``out[offset + payload_offset:]`` (e.g. read there
        from the TUN device): no copy of the inner packet (AES-CBC copies it
        once when ``out`` lacks 15 octets of room after the packet). Same
        errors, same result; on an error ``out`` is unchanged."""
        p = offset + ESP_HEADER_LEN + self._iv_len
        if offset < 0 or n < 0 or p + n > len(out):
            self._refuse(out, offset, n, next_header, 0)
        # AES-CBC's fallback: the inner packet is copied out completely before
        # any octet of out[p:] is written.
        return self.encapsulate_into(out, offset, bytes(memoryview(out)[p : p + n]), next_header)

    def _refuse(self, out: bytearray, offset: int, n: int, next_header: int, total: int) -> None:
        """The slow path: say why a packet cannot be encapsulated."""
        if self.seq >= MAX_SEQ:
            raise Drop(DropReason.SEQ_EXHAUSTED)
        if not 0 <= n <= MAX_INNER or not 0 <= next_header <= 255:
            raise ValueError("inner packet too large or bad next header")
        raise ValueError("output buffer too small for the ESP packet")

    def _scratch(self, need: int) -> memoryview:
        sv = self._scratch_view = memoryview(bytearray(need + _SCRATCH))
        return sv

    def _view(self, out: bytearray) -> memoryview:
        ov = self._out_view = memoryview(out)
        return ov

    def encapsulate(self, inner: Buffer, next_header: int) -> bytes:
        """Convenience for tests and tools: a new ``bytes`` ESP packet."""
        out = bytearray(self.overhead(len(inner)) + len(inner) + _CBC_BLOCK)
        n = self.encapsulate_into(out, 0, inner, next_header)
        self._unbind()  # do not pin the temporary buffer
        return bytes(out[:n])

    def _unbind(self) -> None:
        self._out_view = _EMPTY

    def __repr__(self) -> str:
        return (
            f"OutboundSa(spi=0x{self.spi:08x}, cipher={self.cipher.value}, "
            f"integ={self.integ.value}, worker_id={self.worker_id}, seq={self.seq})"
        )


class _GcmOut(OutboundSa):
    """AES-GCM-16 (RFC 4106): nonce = salt ‖ worker id ‖ seq, AAD = SPI ‖ seq.

    **Encrypted in place.** The inner packet and its trailer are written to
    their final place in ``out`` and ``AESGCM.encrypt_into`` is handed two
    views of ``out`` that start at the same address: the plaintext
    ``out[p:p+L]`` and the output ``out[p:p+L+16]`` (ciphertext ‖ tag). Why
    that is safe with cryptography 50 (checked 2026-11-29 against
    pyca/cryptography ``src/rust/src/backend/aead.rs`` and OpenSSL's GCM):

    * cryptography's ``EvpCipherAead.encrypt_with_context`` makes one
      ``EVP_CipherUpdate(ctx, out, in, L)`` call for the whole payload (AES-GCM
      has block size 1 in EVP, so ``process_data`` takes its streaming branch:
      no stack bounce buffer, no second pass over ``in``), then
      ``EVP_CipherFinal`` and writes the tag to ``out[L:L+16]``, which the
      plaintext view does not cover. Nothing is read from ``in`` after the
      update call.
    * OpenSSL documents exactly this aliasing: EVP_EncryptUpdate(3) and
      provider-cipher(7) "the pointers out and in may point to the same
      location, in which case the encryption will be done in-place"; only a
      *partial* overlap is undefined. Its GCM provider relies on it itself:
      the TLS record path (``gcm_tls_cipher``) refuses to run unless
      ``out == in``, so in-place GCM is what every TLS 1.2 connection does.
      GCM is CTR mode plus GHASH over the ciphertext: each block of input is
      read before the same block of output is written. Decryption in place
      (``InboundSa.decapsulate(in_place=True)``) is the TLS receive path too;
      GHASH consumes each ciphertext block before it is overwritten.
    * What is *not* safe and never done here: a partial overlap (output
      starting inside the input at another address). The installed
      cryptography 50.0.2 silently produces a wrong ciphertext with a valid
      tag for that (measured here at 1402 octets; pyca/cryptography#15656
      addresses it upstream); the views here are cut from the same start
      offset, so the overlap is exact by construction.
    * Rust aliasing: ``encrypt_into`` holds the input (and the nonce, below)
      as ``&[u8]`` and the output as ``&mut [u8]`` over the same memory,
      which Rust's model does not allow; it is harmless here because they
      only reach OpenSSL as raw pointers through FFI (no Rust code reads an
      input after the output is written); the same "unsound, lived with"
      stance ``CffiBuf`` documents for Python buffers in general
      (alexgaynor.net, "buffers on the edge").

    ``tests/dataplane/test_esp_inplace.py`` pins this so an upgrade that breaks
    it fails: the library's in-place results equal its out-of-place ones for
    every length class, our packets equal an independent out-of-place oracle
    and scapy decrypts them, and a spy on ``encrypt_into`` asserts the two
    views start at the same address with output = plaintext + 16 octets.

    **The nonce is written into the tag's place.** ``encrypt_into`` needs the
    12-octet nonce salt ‖ worker id ‖ seq in a buffer; it is packed, together
    with the trailer in front of it, into ``out[p+L:p+L+12]`` where the tag
    will go (one write instead of two), and passed as a view of ``out``. That
    is safe because the nonce is consumed first: cryptography calls
    ``EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce)`` before any data, and
    OpenSSL's GCM ``gcm_init`` copies it into the context (``memcpy(ctx->iv,
    ...)``; J0 and E(K, J0) come from that copy); nothing reads the caller's
    nonce buffer after the update call starts writing. The tag then
    overwrites the nonce, so the salt never stays in ``out`` (should the call
    fail, the slot is zeroed). The oracle test below proves the final bytes.

    Per packet: one ``pack_into`` for SPI ‖ seq ‖ IV, one for trailer ‖ nonce,
    one slice copy (the inner packet; none in :meth:`encapsulate_in_place`)
    and the encrypt call. Everything else comes from one cached tuple per
    (offset, inner length) of the bound output buffer, found with two dict
    lookups: the plaintext, output, nonce and AAD views, the writer and place
    of the trailer ‖ nonce, the trailer for the next header seen last (an
    identity test; another next header costs one more dict lookup), SPI and
    worker id. Only offsets and lengths that fit and valid next headers are
    ever cached, so a hit needs no length or range check; anything else
    takes the checked slow path (:meth:`_slow`). A new output buffer drops
    every cached view (the identity test on ``out``), so no view of an old
    buffer is ever written through.

    The sequence number is checked on every packet without a comparison:
    the counter is a ``range`` iterator over the numbers still allowed, so
    ``next()`` is the increment and the bound check in one C call and
    raises ``StopIteration`` (→ ``Drop(SEQ_EXHAUSTED)``) after 2**32-1;
    it is taken after every other check and before the first write, so a
    refused packet writes nothing and consumes nothing. ``seq`` is a
    property over it.
    """

    __slots__ = (
        "_bound",
        "_encrypt_into",
        "_nviews",
        "_salt_wid",
        "_seqs",
        "_trailers",
        "_views",
    )
    _seqs: Iterator[int]

    def __init__(self, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> None:
        super().__init__(rec, worker_id=worker_id, first_seq=first_seq)
        self._encrypt_into = AESGCM(rec.enc_key).encrypt_into
        self._salt_wid = rec.salt + worker_id.to_bytes(4, "big")
        """The nonce's constant part (RFC 4106 §4: salt ‖ IV's high half)."""
        self._trailers: tuple[dict[int, bytes], ...] = ({}, {}, {}, {})
        """By pad length: next header → trailer ‖ salt ‖ worker id, on first use."""
        self._bound: object = None
        self._views: dict[int, dict[int, _GcmViews]] = {}
        """For the bound ``out``: offset → inner length → views (see
        :meth:`_slow`), so a caller that builds packets at a few offsets of
        one buffer (the worker's UDP GSO batch: datagram k at ``k * size``)
        finds them with two dict lookups."""
        self._nviews = 0
        """Entries in :attr:`_views` (at most ``_VIEWS_MAX``)."""

    @property
    def seq(self) -> int:
        """Last sequence number sent by this worker (0 before the first)."""
        return MAX_SEQ - operator.length_hint(self._seqs)

    @seq.setter
    def seq(self, last: int) -> None:
        # The counter is an iterator over the sequence numbers still allowed:
        # taking one is the increment and the bound check in one C call
        # (StopIteration after 2**32-1), and nothing else can move it.
        self._seqs = iter(range(last + 1, MAX_SEQ + 1))

    def _bind(self, out: bytearray) -> None:
        """A new output buffer: drop every view cut for the old one."""
        self._out_view = memoryview(out)
        self._bound = out
        self._views = {}
        self._nviews = 0

    def _unbind(self) -> None:
        self._out_view = _EMPTY
        self._bound = None
        self._views = {}
        self._nviews = 0

    def _slow(self, out: bytearray, offset: int, n: int, next_header: int) -> _GcmViews:
        """Refuse the packet (``_refuse`` raises), or cut and cache the views
        for an ``n``-octet inner packet at ``offset`` of the bound buffer,
        with the trailer for ``next_header`` as the entry's first choice.
        Only offsets and lengths that fit and valid next headers are cached,
        so a cache hit needs no length or range check."""
        pad = -(n + 2) & 3
        ptlen = n + pad + 2
        total = ptlen + _GCM_FIXED
        if (
            self.seq >= MAX_SEQ
            or not 0 <= n <= MAX_INNER
            or not 0 <= next_header <= 255
            or offset < 0
            or offset + total > len(out)
        ):
            self._refuse(out, offset, n, next_header, total)
        trailers = self._trailers[pad]
        trailer = trailers.get(next_header)
        if trailer is None:
            trailer = trailers[next_header] = _TRAILERS[pad][next_header] + self._salt_wid
        by_len = self._views.get(offset)
        if by_len is None or (n not in by_len and self._nviews >= _VIEWS_MAX):
            if len(self._views) >= _BINDINGS or self._nviews >= _VIEWS_MAX:
                self._views.clear()
                self._nviews = 0
            by_len = self._views[offset] = {}
        entry = by_len.get(n)
        if entry is None:
            if len(by_len) >= _VIEW_CACHE:
                self._nviews -= len(by_len)
                by_len.clear()
            self._nviews += 1
            p = offset + ESP_HEADER_LEN + _GCM_IV
            ct = self._out_view[p : p + ptlen + _GCM_ICV]
            nonce = ct[ptlen : ptlen + 12]  # in the tag's place: class doc
            aad = self._out_view[offset : offset + ESP_HEADER_LEN]
            pack = _TRAILER_NONCE_PACK[pad]
            hdr = (aad, self.spi.to_bytes(4, "big"), self._salt_wid[4:])
            entry = (
                ct[:ptlen],
                ct,
                nonce,
                pack,
                p + n,
                next_header,
                trailer,
                trailers,
                total,
                *hdr,
            )
        else:
            entry = (*entry[:5], next_header, trailer, *entry[7:])
        by_len[n] = entry
        return entry

    def _failed(self, seq: int, nonce: memoryview) -> None:
        """The encrypt call raised: give the sequence number back (nothing
        was sent) and never leave the salt behind in ``out``."""
        self.seq = seq - 1
        nonce[:] = bytes(12)

    def encapsulate_into(self, out: bytearray, offset: int, inner: Buffer, next_header: int) -> int:
        if out is not self._bound:
            self._bind(out)
        n = len(inner)
        try:
            views = self._views[offset][n]
            pt, ct, nonce, pack, at, nh, trailer, trailers, total, aad, spi, wid = views
            if next_header is not nh:
                trailer = trailers[next_header]  # KeyError: not seen yet, or not 0..255
            seq = next(self._seqs)
        except KeyError:
            views = self._slow(out, offset, n, next_header)
            pt, ct, nonce, pack, at, nh, trailer, trailers, total, aad, spi, wid = views
            seq = next(self._seqs)  # _slow refused an exhausted counter
        except StopIteration:
            raise Drop(DropReason.SEQ_EXHAUSTED) from None
        _HDR_IV_PACK(out, offset, spi, seq, wid, seq)
        pack(out, at, trailer, seq)
        pt[:n] = inner
        try:
            self._encrypt_into(nonce, pt, aad, ct)  # exact in place: class doc
        except BaseException:
            self._failed(seq, nonce)
            raise
        return total

    def encapsulate_in_place(self, out: bytearray, offset: int, n: int, next_header: int) -> int:
        if out is not self._bound:
            self._bind(out)
        try:
            views = self._views[offset][n]
            pt, ct, nonce, pack, at, nh, trailer, trailers, total, aad, spi, wid = views
            if next_header is not nh:
                trailer = trailers[next_header]
            seq = next(self._seqs)
        except KeyError:
            views = self._slow(out, offset, n, next_header)
            pt, ct, nonce, pack, at, nh, trailer, trailers, total, aad, spi, wid = views
            seq = next(self._seqs)
        except StopIteration:
            raise Drop(DropReason.SEQ_EXHAUSTED) from None
        _HDR_IV_PACK(out, offset, spi, seq, wid, seq)
        pack(out, at, trailer, seq)
        try:
            self._encrypt_into(nonce, pt, aad, ct)
        except BaseException:
            self._failed(seq, nonce)
            raise
        return total


class _CbcOut(OutboundSa):
    """AES-CBC (RFC 3602) + HMAC; IVs from the chained counter block (module doc)."""

    __slots__ = ("_cbc", "_mac")

    def __init__(self, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> None:
        super().__init__(rec, worker_id=worker_id, first_seq=first_seq)
        # The initial chaining value only shapes the first IV (AES_K(ctr ⊕ it));
        # any fixed value keeps the IVs unpredictable without the key.
        self._cbc = _Cipher(algorithms.AES(rec.enc_key), modes.CBC(bytes(16))).encryptor()
        self._mac = Integrity(self.integ, rec.integ_key)
        # Plaintext is assembled here (counter block ‖ inner ‖ padding ‖
        # trailer), then encrypted into the caller's buffer: one copy of the
        # inner packet, no allocation. Sized for a 9000-octet jumbo inner
        # packet; grows (rarely) beyond.
        self._scratch_view = memoryview(bytearray(_SCRATCH))

    def encapsulate_into(self, out: bytearray, offset: int, inner: Buffer, next_header: int) -> int:
        n = len(inner)
        seq = self.seq + 1
        pad = -(n + 2) & 15
        ptlen = n + pad + 2
        total = self._fixed + ptlen
        if seq > MAX_SEQ or n > MAX_INNER or next_header & ~0xFF or offset < 0:
            self._refuse(out, offset, n, next_header, total)
        if offset + total > len(out):
            self._refuse(out, offset, n, next_header, total)
        ov = self._out_view
        if ov.obj is not out:
            ov = self._view(out)
        _HDR.pack_into(out, offset, self.spi, seq)
        sv = self._scratch_view
        if _CBC_BLOCK + ptlen > len(sv):
            sv = self._scratch(_CBC_BLOCK + ptlen)
        _CTR.pack_into(sv, 0, self.worker_id, seq, 0)
        p = _CBC_BLOCK + n
        sv[_CBC_BLOCK:p] = inner
        sv[p : p + pad + 2] = _TRAILERS[pad][next_header]
        data = sv[: _CBC_BLOCK + ptlen]
        start = offset + ESP_HEADER_LEN
        end = start + _CBC_BLOCK + ptlen
        # update_into wants block_size-1 octets of slack after its output; the
        # ICV area (16 octets for SHA2-256-128) usually provides it.
        if len(out) - end >= _CBC_BLOCK - 1:
            self._cbc.update_into(data, ov[start:])
        else:
            ov[start:end] = self._cbc.update(data)
        ov[end : offset + total] = self._mac.icv(ov[offset:end])
        self.seq = seq
        return total

    def encapsulate_in_place(self, out: bytearray, offset: int, n: int, next_header: int) -> int:
        seq = self.seq + 1
        pad = -(n + 2) & 15
        ptlen = n + pad + 2
        total = self._fixed + ptlen
        if seq > MAX_SEQ or not 0 <= n <= MAX_INNER or next_header & ~0xFF or offset < 0:
            self._refuse(out, offset, n, next_header, total)
        if offset + total > len(out):
            self._refuse(out, offset, n, next_header, total)
        start = offset + ESP_HEADER_LEN
        end = start + _CBC_BLOCK + ptlen
        if len(out) - end < _CBC_BLOCK - 1:
            # No room for update_into's slack after the ciphertext: copy once.
            return super().encapsulate_in_place(out, offset, n, next_header)
        ov = self._out_view
        if ov.obj is not out:
            ov = self._view(out)
        _HDR.pack_into(out, offset, self.spi, seq)
        # The counter block goes where the IV will be; counter ‖ inner ‖ trailer
        # is then encrypted exactly in place (whole blocks only, so the context
        # never holds a partial block; CBC reads block i before writing it).
        _CTR.pack_into(out, start, self.worker_id, seq, 0)
        ov[end - pad - 2 : end] = _TRAILERS[pad][next_header]
        self._cbc.update_into(ov[start:end], ov[start:])
        ov[end : offset + total] = self._mac.icv(ov[offset:end])
        self.seq = seq
        return total


class _NullOut(OutboundSa):
    """NULL encryption (RFC 2410) + HMAC: the payload travels in clear."""

    __slots__ = ("_mac",)

    def __init__(self, rec: SaRecord, *, worker_id: int = 0, first_seq: int = 1) -> None:
        super().__init__(rec, worker_id=worker_id, first_seq=first_seq)
        self._mac = Integrity(self.integ, rec.integ_key)

    def encapsulate_into(self, out: bytearray, offset: int, inner: Buffer, next_header: int) -> int:
        n = len(inner)
        seq = self.seq + 1
        pad = -(n + 2) & 3
        total = self._fixed + n + pad + 2
        if seq > MAX_SEQ or n > MAX_INNER or next_header & ~0xFF or offset < 0:
            self._refuse(out, offset, n, next_header, total)
        if offset + total > len(out):
            self._refuse(out, offset, n, next_header, total)
        ov = self._out_view
        if ov.obj is not out:
            ov = self._view(out)
        _HDR.pack_into(out, offset, self.spi, seq)
        p = offset + ESP_HEADER_LEN
        ov[p : p + n] = inner
        p += n
        end = p + pad + 2
        ov[p:end] = _TRAILERS[pad][next_header]
        ov[end : offset + total] = self._mac.icv(ov[offset:end])
        self.seq = seq
        return total

    def encapsulate_in_place(self, out: bytearray, offset: int, n: int, next_header: int) -> int:
        seq = self.seq + 1
        pad = -(n + 2) & 3
        total = self._fixed + n + pad + 2
        if seq > MAX_SEQ or not 0 <= n <= MAX_INNER or next_header & ~0xFF or offset < 0:
            self._refuse(out, offset, n, next_header, total)
        if offset + total > len(out):
            self._refuse(out, offset, n, next_header, total)
        ov = self._out_view
        if ov.obj is not out:
            ov = self._view(out)
        _HDR.pack_into(out, offset, self.spi, seq)
        p = offset + ESP_HEADER_LEN + n
        end = p + pad + 2
        ov[p:end] = _TRAILERS[pad][next_header]
        ov[end : offset + total] = self._mac.icv(ov[offset:end])
        self.seq = seq
        return total


class InboundSa:
    """One inbound SA: verifies, replay-checks and decrypts ESP packets.

    Order (RFC 4303 §3.4): length checks → ICV (for CBC and NULL before any
    decryption; for GCM the tag check is part of decryption) → replay check and
    window update (only for an authentic packet, §3.4.3) → padding → next
    header. Every refusal is a ``Drop`` with a countable reason. Constructing
    ``InboundSa(rec)`` returns the subclass for the record's cipher.

    **Where the plaintext goes.** By default AES-GCM and AES-CBC decrypt into a
    fresh buffer per packet and leave ``packet`` untouched. With
    ``in_place=True`` the caller hands over ``packet`` (it must be writable,
    e.g. a view of the worker's receive buffer): the plaintext is written over
    the ciphertext, starting at the same address (exact in-place, see
    ``_GcmOut`` for why that is safe with cryptography 50 / OpenSSL), the
    returned inner packet is a view of ``packet`` and nothing is allocated.
    The packet's ciphertext is gone afterwards, also when a ``Drop`` is raised
    (for a bad ICV the region is zeroed, so no unauthenticated plaintext is
    left behind). AES-CBC with HMAC-SHA1-96 keeps allocating even then
    (cryptography's ``update_into`` wants 15 octets of room after the data,
    the 12-octet ICV does not provide it). NULL always returns a view of
    ``packet``.
    """

    __slots__ = ("_iv_len", "_min_len", "cipher", "icv_len", "integ", "replay", "spi")

    def __new__(cls, rec: SaRecord) -> InboundSa:
        if cls is InboundSa:
            cipher = Cipher(rec.cipher)
            cls = _GcmIn if cipher in _GCM else _CbcIn if cipher in _CBC else _NullIn
        return object.__new__(cls)

    def __init__(self, rec: SaRecord) -> None:
        _check_integ(rec)
        self.spi: int = rec.spi
        self.cipher: Cipher = Cipher(rec.cipher)
        self.integ: Integ = Integ(rec.integ)
        self._iv_len, _, self.icv_len = _geometry(self.cipher, self.integ)
        self.replay: ReplayWindow | None = (
            ReplayWindow(rec.replay_window) if rec.replay_window > 0 else None
        )
        """The anti-replay window, or None when the SA has replay protection off."""
        # header, IV, at least the 2-octet trailer (a whole block for CBC), ICV
        trailer = _CBC_BLOCK if self.cipher in _CBC else 2
        self._min_len = ESP_HEADER_LEN + self._iv_len + trailer + self.icv_len

    @classmethod
    def from_record(cls, rec: SaRecord) -> InboundSa:
        """Build the SA's cipher state once, when its record lands."""
        return InboundSa(rec)

    def open(self, packet: Buffer, in_place: bool = False) -> tuple[int, memoryview]:
        """ESP processing without the tunnel-mode policy: (next header, payload).

        The payload view is writable when ``packet`` is (the MSS clamp edits in
        place): it aliases ``packet`` for NULL encryption and with
        ``in_place`` (class doc), and is a fresh buffer otherwise. Raises
        ``Drop``: MALFORMED, UNKNOWN_SPI, BAD_ICV, REPLAY, BAD_PAD;
        ``ValueError`` for ``in_place`` with a read-only ``packet``.
        """
        mv = memoryview(packet)
        n = len(mv)
        if n < self._min_len:
            raise Drop(DropReason.MALFORMED, "ESP packet too short")
        spi, seq = _HDR_UNPACK(mv, 0)
        if spi != self.spi:
            raise Drop(DropReason.UNKNOWN_SPI, "SPI does not match this SA")
        if in_place and mv.readonly:
            raise ValueError("in_place decryption needs a writable packet buffer")
        pt = self._unprotect(mv, n, seq, in_place)
        m = len(pt)
        padlen = pt[m - 2]
        body = m - 2 - padlen
        if body < 0 or (padlen and pt[body : m - 2] != _PADS[padlen]):
            raise Drop(DropReason.BAD_PAD)
        return pt[m - 1], pt[:body]

    def _unprotect(self, mv: memoryview, n: int, seq: int, in_place: bool) -> memoryview:
        """Verify, replay-check and decrypt; the plaintext incl. its trailer."""
        raise NotImplementedError  # each cipher's subclass implements it

    def _replay(self, seq: int) -> None:
        """RFC 4303 §3.4.3 after the ICV verified: refuse a replay, else slide."""
        window = self.replay
        if window is not None and not window.accept(seq):
            raise Drop(DropReason.REPLAY)

    def decapsulate(self, packet: Buffer, in_place: bool = False) -> tuple[int, memoryview]:
        """Tunnel mode: (next header 4 or 41, the inner packet).

        Raises ``Drop`` with MALFORMED, UNKNOWN_SPI, BAD_ICV, REPLAY (only with
        a replay window, checked after the ICV), BAD_PAD, DUMMY (next header
        59, RFC 4303 §2.6) or UNKNOWN_NEXT_HEADER. ``in_place``: class doc.
        """
        nh, inner = self.open(packet, in_place)
        if nh in (NEXT_HEADER_IPV4, NEXT_HEADER_IPV6):
            return nh, inner
        if nh == NEXT_HEADER_NONE:
            raise Drop(DropReason.DUMMY)
        raise Drop(DropReason.UNKNOWN_NEXT_HEADER)

    def __repr__(self) -> str:
        return (
            f"InboundSa(spi=0x{self.spi:08x}, cipher={self.cipher.value}, "
            f"integ={self.integ.value}, replay={self.replay!r})"
        )


class _GcmIn(InboundSa):
    """AES-GCM-16: ``decapsulate`` is one straight-line method (the hot path)."""

    __slots__ = ("_decrypt_into", "_salt")

    def __init__(self, rec: SaRecord) -> None:
        super().__init__(rec)
        self._decrypt_into = AESGCM(rec.enc_key).decrypt_into
        self._salt = rec.salt

    def _unprotect(self, mv: memoryview, n: int, seq: int, in_place: bool) -> memoryview:
        # Plaintext at the ciphertext's own address (exact in place) or fresh.
        pt = mv[16 : n - _GCM_ICV] if in_place else memoryview(bytearray(n - _GCM_FIXED))
        try:
            self._decrypt_into(self._salt + mv[8:16], mv[16:n], mv[0:8], pt)
        except InvalidTag:
            if in_place:
                pt[:] = bytes(n - _GCM_FIXED)  # no unauthenticated plaintext left behind
            raise Drop(DropReason.BAD_ICV) from None
        window = self.replay
        if window is not None and not window.accept(seq):
            raise Drop(DropReason.REPLAY)
        return pt

    def decapsulate(self, packet: Buffer, in_place: bool = False) -> tuple[int, memoryview]:
        # InboundSa.open + _unprotect + decapsulate inlined: two calls fewer.
        mv = packet if type(packet) is memoryview else memoryview(packet)
        n = len(mv)
        if n < _GCM_MIN:
            raise Drop(DropReason.MALFORMED, "ESP packet too short")
        spi, seq = _HDR_UNPACK(mv, 0)
        if spi != self.spi:
            raise Drop(DropReason.UNKNOWN_SPI, "SPI does not match this SA")
        m = n - _GCM_FIXED
        if in_place:
            if mv.readonly:
                raise ValueError("in_place decryption needs a writable packet buffer")
            pt = mv[16 : n - 16]
        else:
            pt = memoryview(bytearray(m))
        try:
            self._decrypt_into(self._salt + mv[8:16], mv[16:n], mv[0:8], pt)
        except InvalidTag:
            if in_place:
                pt[:] = bytes(m)
            raise Drop(DropReason.BAD_ICV) from None
        window = self.replay
        if window is not None and not window.accept(seq):
            raise Drop(DropReason.REPLAY)
        padlen = pt[m - 2]
        body = m - 2 - padlen
        if body < 0 or (padlen and pt[body : m - 2] != _PADS[padlen]):
            raise Drop(DropReason.BAD_PAD)
        nh = pt[m - 1]
        if nh == 4 or nh == 41:
            return nh, pt[:body]
        if nh == NEXT_HEADER_NONE:
            raise Drop(DropReason.DUMMY)
        raise Drop(DropReason.UNKNOWN_NEXT_HEADER)


class _CbcIn(InboundSa):
    __slots__ = ("_cbc", "_mac")

    def __init__(self, rec: SaRecord) -> None:
        super().__init__(rec)
        self._cbc = _Cipher(algorithms.AES(rec.enc_key), modes.CBC(bytes(16))).decryptor()
        self._mac = Integrity(self.integ, rec.integ_key)

    def _unprotect(self, mv: memoryview, n: int, seq: int, in_place: bool) -> memoryview:
        end = n - self.icv_len
        if not hmac.compare_digest(self._mac.icv(mv[:end]), mv[end:n]):
            raise Drop(DropReason.BAD_ICV)
        if (end - ESP_HEADER_LEN) & 15:
            # Authentic but not a whole number of blocks: a sender bug.
            raise Drop(DropReason.MALFORMED, "CBC payload not block aligned")
        if self.replay is not None:
            self._replay(seq)
        # Feed IV ‖ ciphertext; the first output block is discarded and leaves
        # the chaining state at the packet's IV (module docstring). Whole blocks
        # only, so the context never holds a partial block between packets.
        if in_place and n - end >= _CBC_BLOCK - 1:
            # Exact in place: output starts where the input does; the (already
            # verified) ICV provides update_into's 15 octets of slack.
            m = self._cbc.update_into(mv[ESP_HEADER_LEN:end], mv[ESP_HEADER_LEN:])
            return mv[ESP_HEADER_LEN + _CBC_BLOCK : ESP_HEADER_LEN + m]
        buf = bytearray(end - ESP_HEADER_LEN + _CBC_BLOCK - 1)
        m = self._cbc.update_into(mv[ESP_HEADER_LEN:end], buf)
        return memoryview(buf)[_CBC_BLOCK:m]


class _NullIn(InboundSa):
    __slots__ = ("_mac",)

    def __init__(self, rec: SaRecord) -> None:
        super().__init__(rec)
        self._mac = Integrity(self.integ, rec.integ_key)

    def _unprotect(self, mv: memoryview, n: int, seq: int, in_place: bool) -> memoryview:
        end = n - self.icv_len
        if not hmac.compare_digest(self._mac.icv(mv[:end]), mv[end:n]):
            raise Drop(DropReason.BAD_ICV)
        if self.replay is not None:
            self._replay(seq)
        return mv[ESP_HEADER_LEN:end]
